#!/usr/bin/env python
"""Mean@k and Pass@k of scored generations, per benchmark and averaged, as paper-style tables.

python tools/evaluate.py gen/test.jsonl gen/ood.jsonl --k 8 --method RIFT --output rift.json
python tools/evaluate.py gen/all.jsonl --benchmark-field split --k 8
python tools/evaluate.py --tables base.json rift.json rft.json   # compare saved results
"""

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_rift.evaluation import RecordError, evaluate_files, markdown_table, results_dict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "files",
        nargs="*",
        help="generation JSONL files; one benchmark per file "
        "(named by the file stem) unless --benchmark-field is given",
    )
    parser.add_argument("--k", type=int, default=8, help="k of Mean@k / Pass@k (default 8)")
    parser.add_argument(
        "--benchmark-field",
        "--split",
        dest="benchmark_field",
        default=None,
        help="record field naming each record's benchmark (e.g. split)",
    )
    parser.add_argument("--method", default="model", help="row label in the table (default: model)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--tables",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="print one comparison table from results JSON files saved by --output",
    )
    return parser.parse_args(argv)


def _load_results(path: Path) -> dict:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: cannot read results JSON ({error})") from None
    if not isinstance(result, dict) or not {"method", "k", "benchmarks", "average"} <= set(result):
        raise RecordError(f"{path}: not a results file written by tools/evaluate.py --output")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.tables:
            results = [_load_results(path) for path in args.tables]
        elif args.files:
            scores = evaluate_files(args.files, args.k, args.benchmark_field)
            results = [results_dict(scores, args.k, args.method)]
        else:
            print("error: give generation files, or --tables RESULTS_JSON ...", file=sys.stderr)
            return 2
    except (RecordError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for metric in ("mean_at_k", "pass_at_k"):
        print(markdown_table(results, metric) + "\n")
    if args.output and not args.tables:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(json.dumps(results[0], indent=2) + "\n")
        os.replace(tmp, args.output)
        print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
