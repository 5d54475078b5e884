"""The trainer's typed configuration: one dataclass per concern, each field one command-line flag.

``python -m megatron_rift.train`` parses its command line once into a :class:`TrainConfig`
(:mod:`megatron_rift.training.arguments` builds the parser from these fields, so a flag's name,
default, choices and help are written once, here) and every component receives the section it
needs. The demo and the tests build a ``TrainConfig`` directly and launch the trainer with it
(``--config FILE.json``, :func:`save_config`).

Flag names are Megatron-LM's where it has one. Defaults follow the paper's recipe (section 4.1)
where it gives one, and say where they come from where it does not (docs/training.md, "Defaults").
This module imports nothing heavy, so every rank checks its configuration in a second.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_rift.objectives import NEGATIVE_MODES, REFERENCE_MODES, RIFT

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")
CROSS_ENTROPY_FUSIONS = ("linear",)
# = megatron_rift.model.linear_cross_entropy.DEFAULT_CHUNK_TOKENS (that module imports torch)
CROSS_ENTROPY_CHUNK_TOKENS = 512
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")

# Paper section 4.1 recipe.
PAPER_GLOBAL_BATCH_SIZE = 64
PAPER_EPOCHS = 3
PAPER_WARMUP_FRACTION = 0.05
PAPER_DECAY_STYLE = "cosine"


def flag(
    default=None,
    help: str = "",
    *,
    name: str | None = None,
    choices=None,
    metavar: str | None = None,
    required: bool = False,
    negate: bool = False,
):
    """A config field that is also a command-line flag.

    ``name`` overrides the flag (default ``--field-name``); ``negate`` makes a True-by-default
    bool a ``--no-...`` switch (``name`` then names that switch).
    """
    metadata = {
        "help": help,
        "name": name,
        "choices": choices,
        "metavar": metavar,
        "required": required,
        "negate": negate,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class DataConfig:
    data_path: str = flag(
        None,
        "packed rollout dataset written by tools/pack_rollouts.py "
        "(PREFIX.bin/.idx/.rewards.npy/.json)",
        metavar="PREFIX",
        required=True,
    )
    seq_length: int | None = flag(
        None, "tokens per row; default: the longest rollout, rounded up to 16"
    )
    sequence_packing: bool = flag(
        False,
        "pack several rollouts into each row of seq-length "
        "tokens (block-causal attention; TE uses the THD packed format)",
    )
    shuffle: bool = flag(
        True,
        "read the dataset in order instead of a seeded shuffle per epoch",
        name="--no-shuffle",
        negate=True,
    )


@dataclasses.dataclass
class ObjectiveConfig:
    name: str = flag(
        RIFT.name, "training objective (megatron_rift/objectives/registry.py)", name="--objective"
    )
    negative_mode: str = flag(
        "token",
        "how RIFT scores negative samples: per token p_t "
        "(default, paper's practical form), whole-sequence probability, "
        "or geometric mean",
        choices=NEGATIVE_MODES,
    )
    beta: float | None = flag(
        None,
        "inverse temperature of a preference objective (default: "
        "the objective's own, dpo/kto 0.1, simpo 2.0)",
    )
    simpo_gamma: float = flag(1.0, "SimPO target reward margin")
    kto_desirable_weight: float = flag(1.0, "KTO lambda_D")
    kto_undesirable_weight: float = flag(1.0, "KTO lambda_U")
    reference: str = flag(
        "precomputed",
        "reference log-probs (dpo, kto): read from "
        "--ref-logprobs (written once by tools/compute_ref_logprobs.py; memory "
        "as SFT), or computed by a frozen copy of the starting model kept in "
        "memory (PP=1 only)",
        choices=REFERENCE_MODES,
    )
    ref_logprobs: str | None = flag(
        None, "precomputed reference log-probs (default: DATA_PATH.ref_logprobs)", metavar="PATH"
    )


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = flag(1, "pipeline-parallel size")
    # Layouts and communication overlap (docs/layouts.md); Megatron-LM's names and meanings.
    sequence_parallel: bool = flag(
        False,
        "split norm/dropout activations along the sequence over the tensor-parallel ranks "
        "(needs TP > 1)",
    )
    context_parallel_size: int = flag(
        1, "context-parallel size: each sequence split into 2 x CP chunks over CP ranks"
    )
    cp_comm_type: str | None = flag(
        None,
        "Transformer Engine's context-parallel attention communication (default p2p)",
        choices=CP_COMM_TYPES,
    )
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None, "layers per virtual pipeline stage: Megatron's interleaved 1F1B schedule"
    )
    overlap_grad_reduce: bool = flag(
        False, "overlap the data-parallel gradient reduce with the backward pass"
    )
    overlap_param_gather: bool = flag(
        False,
        "overlap the distributed optimizer's parameter all-gather with the next forward pass",
    )
    ddp_bucket_size: int | None = flag(
        None, "elements per gradient-reduce bucket (default: Megatron's)", metavar="ELEMENTS"
    )
    tp_comm_overlap: bool = flag(
        False,
        "overlap tensor-parallel communication with GEMMs (Transformer Engine userbuffers; "
        "needs --sequence-parallel)",
    )


@dataclasses.dataclass
class ScheduleConfig:
    micro_batch_size: int = flag(
        1, "units (rollouts, pairs or KTO samples) per micro-batch on each data-parallel rank"
    )
    global_batch_size: int = flag(
        PAPER_GLOBAL_BATCH_SIZE, "units per optimizer step over all ranks (paper: 64)"
    )
    train_iters: int | None = flag(None, "optimizer steps; overrides --epochs")
    epochs: float = flag(
        PAPER_EPOCHS, "passes over the dataset when --train-iters is not given (paper: 3)"
    )
    seed: int = flag(1234, "seed of the initialization, the data order and dropout")


@dataclasses.dataclass
class OptimConfig:
    lr: float | None = flag(
        None,
        "peak learning rate; default per objective (paper: 2e-6 for "
        "rift/naive, 1e-5 for sft/dft/rft)",
    )
    min_lr: float = flag(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = flag(PAPER_DECAY_STYLE, "learning-rate decay", choices=LR_DECAY_STYLES)
    lr_warmup_fraction: float | None = flag(
        None, f"fraction of steps for linear warmup (default {PAPER_WARMUP_FRACTION}, paper: 5%%)"
    )
    lr_warmup_iters: int | None = flag(None, "warmup steps (instead of --lr-warmup-fraction)")
    lr_decay_iters: int | None = flag(
        None, "steps over which the lr decays; default: all training steps"
    )
    weight_decay: float = flag(0.0, "decoupled (AdamW) weight decay; the paper gives none")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    clip_grad: float = flag(1.0, "global gradient-norm clip")
    use_distributed_optimizer: bool = flag(
        False, "shard optimizer state over data-parallel ranks (ZeRO-1)"
    )

    @property
    def warmup_fraction(self) -> float:
        return PAPER_WARMUP_FRACTION if self.lr_warmup_fraction is None else self.lr_warmup_fraction


@dataclasses.dataclass
class PrecisionConfig:
    bf16: bool = flag(False, "bf16 weights/activations, fp32 master weights")
    fp16: bool = flag(False, "fp16 with dynamic loss scaling")
    fp8_format: str | None = flag(
        None,
        "FP8 GEMMs through Transformer Engine (needs TE and a GPU with FP8)",
        choices=("e4m3", "hybrid"),
    )
    fp8_recipe: str = flag(
        "delayed", "TE FP8 scaling recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise")
    )
    transformer_impl: str = flag(
        "auto", "layer implementation; auto = TE when it runs here", choices=TRANSFORMER_IMPLS
    )
    # Megatron-LM's names. Its own implementations (native, te) fuse only the softmax and still
    # build the whole micro-batch's logits; 'linear' is the chunked output layer + CE here
    # (megatron_rift/model/linear_cross_entropy.py; Megatron-LM's dev branch has one of that name,
    # for Blackwell GPUs only).
    cross_entropy_loss_fusion: bool = flag(
        False,
        "compute the output layer and the cross-entropy together, a chunk of tokens at a time, "
        "never holding the whole micro-batch's [tokens, vocab/TP] logits (exact; one extra "
        "logits GEMM)",
    )
    cross_entropy_fusion_impl: str = flag(
        "linear", "implementation of --cross-entropy-loss-fusion", choices=CROSS_ENTROPY_FUSIONS
    )
    cross_entropy_fusion_chunk_size: int | None = flag(
        None,
        f"tokens per chunk of --cross-entropy-loss-fusion (default {CROSS_ENTROPY_CHUNK_TOKENS}; "
        "a chunk's fp32 logits take chunk x vocab/TP x 4 bytes)",
        metavar="TOKENS",
    )

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def cross_entropy_chunk(self) -> int | None:
        """Tokens per chunk of the fused output layer + CE; None when the fusion is off."""
        if not self.cross_entropy_loss_fusion:
            return None
        chunk = self.cross_entropy_fusion_chunk_size
        return CROSS_ENTROPY_CHUNK_TOKENS if chunk is None else chunk


@dataclasses.dataclass
class ArchitectureConfig:
    """The model's shape for a run from scratch (a checkpoint's model_config.json defines it
    otherwise, and a flag that contradicts it is an error). Field names are GPTArchitecture's."""

    num_layers: int | None = flag(None, "transformer layers")
    hidden_size: int | None = flag(None, "hidden size")
    num_attention_heads: int | None = flag(None, "attention heads")
    num_query_groups: int | None = flag(None, "key/value heads (GQA); default: = heads")
    ffn_hidden_size: int | None = flag(None, "MLP hidden size; default: 4 x hidden")
    kv_channels: int | None = flag(None, "head dimension; default: hidden / heads")
    max_position_embeddings: int | None = flag(None, "longest position (RoPE)")
    rotary_base: float | None = flag(None, "RoPE base")
    norm_epsilon: float | None = flag(None, "normalization epsilon")
    vocab_size: int | None = flag(
        None, "tokenizer vocabulary before padding (default: the dataset's PREFIX.json)"
    )
    make_vocab_size_divisible_by: int | None = flag(
        None, "pad the vocabulary to a multiple of this x TP (default 128)"
    )
    normalization: str | None = flag(None, "normalization layer", choices=("RMSNorm", "LayerNorm"))
    untie_embeddings_and_output_weights: bool | None = flag(None, "separate output layer")
    add_qkv_bias: bool | None = flag(None, "bias on the QKV projection (Qwen2)")
    qk_layernorm: bool | None = flag(None, "RMSNorm on queries and keys (Qwen3)")
    swiglu: bool | None = flag(None, "SwiGLU MLP (default on)")

    def given(self) -> dict:
        """The GPTArchitecture fields these flags set."""
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        untie = fields.pop("untie_embeddings_and_output_weights", None)
        if untie is not None:
            fields["tie_word_embeddings"] = not untie
        return fields


MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
MOE_TOKEN_DISPATCHERS = ("allgather", "alltoall")


@dataclasses.dataclass
class MoEConfig:
    """Mixture-of-experts runs (Megatron-LM's flags; a dense model refuses them). The expert layout
    (number, size, top-k, router normalization) comes from model_config.json."""

    expert_model_parallel_size: int = flag(1, "ranks that share each MoE layer's experts (EP)")
    expert_tensor_parallel_size: int | None = flag(
        None, "tensor-parallel size inside each expert (default: --tensor-model-parallel-size)"
    )
    moe_router_topk: int | None = flag(
        None, "experts per token (default: the model's, from its HF config)"
    )
    moe_aux_loss_coeff: float | None = flag(
        None,
        "weight of the router's load-balancing loss (default: the HF config's "
        "router_aux_loss_coef); docs/moe.md says how it combines with the per-token loss",
    )
    moe_router_load_balancing_type: str | None = flag(
        None, "load-balancing loss (default aux_loss)", choices=MOE_LOAD_BALANCING_TYPES
    )
    moe_z_loss_coeff: float | None = flag(None, "weight of the router z-loss (default: none)")
    moe_token_dispatcher_type: str | None = flag(
        None,
        "how tokens reach their experts' ranks (default allgather)",
        choices=MOE_TOKEN_DISPATCHERS,
    )
    moe_grouped_gemm: bool = flag(
        False, "all local experts in one grouped GEMM (TEGroupedMLP: Transformer Engine + GPU)"
    )

    def given(self) -> list[str]:
        """The flags set away from their defaults (a dense model accepts none of them)."""
        defaults = MoEConfig()
        return [
            "--" + f.name.replace("_", "-")
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        ]


@dataclasses.dataclass
class MemoryConfig:
    """Activation recompute (Megatron-LM's flags; Megatron-Core's TransformerConfig fields)."""

    recompute_granularity: str | None = flag(
        None,
        "recompute activations in the backward pass: full layers, or selective (core attention)",
        choices=RECOMPUTE_GRANULARITIES,
    )
    recompute_method: str | None = flag(
        None,
        "full recompute: uniform (every group of --recompute-num-layers) or block (the first "
        "--recompute-num-layers of each pipeline stage)",
        choices=RECOMPUTE_METHODS,
    )
    recompute_num_layers: int | None = flag(
        None, "layers per recompute group (uniform) or recomputed per stage (block)"
    )


@dataclasses.dataclass
class CheckpointConfig:
    load: str | None = flag(
        None,
        "checkpoint root to start from: a trainer checkpoint resumes "
        "exactly; a converted model (tracker 'release') starts fine-tuning at "
        "step 0; an empty or missing folder falls back to "
        "--pretrained-checkpoint",
    )
    pretrained_checkpoint: str | None = flag(
        None,
        "converted model to fine-tune from when --load "
        "holds no checkpoint (so --load = --save restarts a "
        "crashed job from its last save)",
    )
    ckpt_step: int | None = flag(None, "load this iteration from --load instead of the tracker's")
    finetune: bool = flag(False, "take only the model weights from --load and start at step 0")
    load_optim: bool = flag(
        True,
        "do not load optimizer and scheduler state when resuming",
        name="--no-load-optim",
        negate=True,
    )
    load_rng: bool = flag(True, "do not restore RNG states", name="--no-load-rng", negate=True)
    save: str | None = flag(None, "checkpoint root to write")
    save_interval: int | None = flag(
        None, "save every N steps (and always at the end when --save is given)"
    )
    keep_last_checkpoints: int | None = flag(
        None, "delete older iter_* folders after each save, keeping this many"
    )
    load_fallback: str | None = flag(
        None,
        "when the checkpoint the tracker in --load names is missing or incomplete, resume from "
        "the newest complete one before it (and say so) instead of stopping with an error",
        choices=("previous",),
    )
    from_scratch: bool = flag(
        False,
        "start from randomly initialized weights (shape from the architecture flags) when "
        "--load holds no checkpoint; a run with no checkpoint, no --pretrained-checkpoint and "
        "no architecture flags is an error",
    )


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = flag(
        1, "print the progress line every N steps (metrics.jsonl gets every step)"
    )
    log_file: str | None = flag(
        None,
        "one JSON object per step: step, loss, lr, grad_norm, "
        "tokens, tokens_per_s and the objective's metrics",
        metavar="metrics.jsonl",
    )
    tensorboard_dir: str | None = flag(None, "TensorBoard log folder")
    wandb_project: str | None = flag(None, "Weights & Biases project")
    wandb_exp_name: str | None = flag(None, "Weights & Biases run name")


@dataclasses.dataclass
class ReliabilityConfig:
    """What a fault does (docs/reliability.md). Megatron-LM's names."""

    check_for_nan_in_loss_and_grad: bool = flag(
        True,
        "do not check each step's loss terms and gradients for NaN/Inf before the update",
        name="--no-check-for-nan-in-loss-and-grad",
        negate=True,
    )
    skip_nan_steps: int = flag(
        0,
        "skip (do not apply, log) up to N steps with a NaN/Inf loss or gradient instead of "
        "stopping at the first",
        metavar="N",
    )
    distributed_timeout_minutes: float = flag(
        10.0,
        "how long a collective waits for a rank before the run stops naming the lost rank(s) "
        "(the process groups' timeout)",
    )


@dataclasses.dataclass
class TrainConfig:
    """Everything ``megatron_rift.train`` runs on; each field is one section of flags."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    optimizer: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    architecture: ArchitectureConfig = dataclasses.field(default_factory=ArchitectureConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    reliability: ReliabilityConfig = dataclasses.field(default_factory=ReliabilityConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    # Modules imported before the configuration is checked: they may register objectives
    # (megatron_rift.objectives.register).
    plugins: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "the configuration") -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown sections or fields are an error (a typo must
        not be ignored)."""
        kwargs = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in data.items():
            if name not in sections:
                raise ValueError(
                    f"{source}: unknown section {name!r} (known: {', '.join(sections)})"
                )
            if name == "plugins":
                kwargs[name] = tuple(value)
                continue
            section_cls = sections[name].default_factory
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"{source}: unknown field(s) {unknown} in section {name!r}")
            kwargs[name] = section_cls(**value)
        return cls(**kwargs)


SECTIONS = {
    f.name: f.default_factory for f in dataclasses.fields(TrainConfig) if f.name != "plugins"
}


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config`` as JSON for ``python -m megatron_rift.train --config PATH``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_config(path: str | Path) -> TrainConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--config {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of sections")
    return TrainConfig.from_dict(data, source=str(path))
