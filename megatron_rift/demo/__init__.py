"""Building blocks of the end-to-end demo: a synthetic verifiable math task and its tokenizer."""
