"""The demo's stages, each a call into the project's own tools.

Training and reference scoring run as subprocesses (``python -m megatron_rift.train`` under
torchrun when TP > 1, ``tools/compute_ref_logprobs.py``) because Megatron's parallel state is
process-global; packing, HF export, generation and evaluation are library calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_rift.demo.config import DemoConfig
from megatron_rift.demo.task import Problem, write_problems_jsonl
from megatron_rift.training.config import (
    ArchitectureConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]


_LAUNCHER_VARIABLES = {
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
}


class StageError(RuntimeError):
    """A stage's subprocess failed; the message holds its command and the tail of its output."""


def _run(cmd: list[str], log_path: Path, what: str) -> None:
    # Each stage is a launch of its own: no rendezvous settings leak in from the caller.
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise StageError(
            f"{what} failed (exit {proc.returncode}); full log: {log_path}\n"
            f"command: {' '.join(cmd)}\n" + "\n".join(tail)
        )


def write_sft_records(problems: list[Problem], path: Path, style: str) -> Path:
    """Problems with a known solution as rollout records of reward 1 (what the packer reads).

    ``style`` is ``"model"`` (the base's pretraining format) or ``"expert"`` (ground truth for SFT/DFT).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            solution = p.solution if style == "model" else (p.expert_solution or p.solution)
            if solution:
                f.write(
                    json.dumps(
                        {
                            "prompt": p.prompt,
                            "response": solution,
                            "reward": 1.0,
                            "prompt_id": p.prompt_id,
                        }
                    )
                    + "\n"
                )
    tmp.replace(path)
    return path


def pack(
    inputs: list[Path],
    prefix: Path,
    tokenizer_dir: Path,
    cfg: DemoConfig,
    keep: str = "all",
    reward_scheme: str = "constant",
    negative_reward: float | None = None,
) -> dict:
    from megatron_rift.data.packing import PackConfig, pack_rollouts

    prefix.parent.mkdir(parents=True, exist_ok=True)
    return pack_rollouts(
        PackConfig(
            inputs=[str(p) for p in inputs],
            output_prefix=str(prefix),
            tokenizer=str(tokenizer_dir),
            max_seq_length=cfg.seq_length,
            overlong="truncate",
            reward_scheme=reward_scheme,
            positive_reward=cfg.positive_reward,
            negative_reward=cfg.negative_reward if negative_reward is None else negative_reward,
            keep=keep,
            overwrite=True,
            seed=cfg.seed,
            progress=False,
        )
    )


def fit_batch(data_prefix: Path, global_batch: int, micro_batch: int) -> tuple[int, int]:
    """Shrink the global batch to the dataset when it is smaller than one batch (small user files,
    the miniature), keeping it a multiple of the micro-batch."""
    info = json.loads(Path(f"{data_prefix}.json").read_text())
    num_samples = info["num_pairs"] if info.get("pairs") else info["rollouts"]  # units
    global_batch = max(1, min(global_batch, num_samples))
    micro_batch = min(micro_batch, global_batch)
    return global_batch - global_batch % micro_batch, micro_batch


def architecture(cfg: DemoConfig) -> ArchitectureConfig:
    """The tiny base model's shape (Llama-style: RMSNorm, SwiGLU, RoPE, GQA)."""
    return ArchitectureConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        # Generation runs past the training length (prompt + max_new_tokens).
        max_position_embeddings=cfg.seq_length + cfg.max_new_tokens,
    )


def train_config(
    cfg: DemoConfig,
    data_prefix: Path,
    save: Path,
    objective: str,
    lr: float,
    epochs: float,
    global_batch: int,
    log_dir: Path,
    pretrained: Path | None = None,
    seed: int | None = None,
    negative_mode: str = "token",
    save_interval: int | None = None,
) -> TrainConfig:
    """The trainer's configuration for one demo run: the paper's recipe scaled down (AdamW,
    cosine to lr/10, 5% warmup, no weight decay, gradient clip 1)."""
    global_batch, micro_batch = fit_batch(data_prefix, global_batch, cfg.micro_batch_size)
    return TrainConfig(
        data=DataConfig(data_path=str(data_prefix), seq_length=cfg.seq_length),
        objective=ObjectiveConfig(name=objective, negative_mode=negative_mode),
        parallel=ParallelConfig(tensor_model_parallel_size=cfg.tensor_parallel),
        schedule=ScheduleConfig(
            micro_batch_size=micro_batch,
            global_batch_size=global_batch,
            epochs=epochs,
            seed=cfg.seed if seed is None else seed,
        ),
        optimizer=OptimConfig(
            lr=lr,
            min_lr=lr / 10,
            lr_decay_style="cosine",
            lr_warmup_fraction=0.05,
            weight_decay=0.0,
            clip_grad=1.0,
        ),
        architecture=architecture(cfg) if pretrained is None else ArchitectureConfig(),
        checkpoint=CheckpointConfig(
            save=str(save),
            pretrained_checkpoint=None if pretrained is None else str(pretrained),
            save_interval=save_interval,
        ),
        logging=LoggingConfig(log_file=str(log_dir / "metrics.jsonl"), log_interval=10),
    )


def _launcher(cfg: DemoConfig) -> list[str]:
    if cfg.tensor_parallel == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.tensor_parallel}",
    ]


def train(
    cfg: DemoConfig,
    data_prefix: Path,
    save: Path,
    objective: str,
    lr: float,
    epochs: float,
    global_batch: int,
    log_dir: Path,
    pretrained: Path | None = None,
    seed: int | None = None,
    negative_mode: str = "token",
    save_interval: int | None = None,
) -> Path:
    """Run the trainer; returns its metrics.jsonl. From scratch when ``pretrained`` is None."""
    config = train_config(
        cfg,
        data_prefix,
        save,
        objective,
        lr,
        epochs,
        global_batch,
        log_dir,
        pretrained,
        seed,
        negative_mode,
        save_interval,
    )
    config_file = save_config(config, log_dir / "train_config.json")
    cmd = _launcher(cfg) + ["-m", "megatron_rift.train", "--config", str(config_file)]
    _run(cmd, log_dir / "train.log", f"training ({objective})")
    return Path(config.logging.log_file)


def compute_ref_logprobs(ckpt: Path, data_prefix: Path, cfg: DemoConfig, log_dir: Path) -> None:
    """The base model's log-probs over a packed dataset, once, for DPO/KTO (PREFIX.ref_logprobs)."""
    cmd = _launcher(cfg) + [
        str(REPO / "tools" / "compute_ref_logprobs.py"),
        "--load",
        str(ckpt),
        "--data-path",
        str(data_prefix),
        "--seq-length",
        str(cfg.seq_length),
        "--micro-batch-size",
        str(cfg.micro_batch_size),
        "--tensor-model-parallel-size",
        str(cfg.tensor_parallel),
        "--overwrite",
        "--no-progress",
    ]
    _run(
        cmd,
        log_dir / f"ref_logprobs_{data_prefix.name}.log",
        f"reference log-probs of {data_prefix}",
    )


def write_pair_records(rollouts: Path, problems: list[Problem], path: Path) -> Path:
    """The rollouts with their problem's expert solution as ``solution`` (packed with --pairs
    ground-truth: the rollout is preferred when correct, the solution otherwise)."""
    solutions = {p.prompt_id: p.expert_solution or p.solution for p in problems}
    with open(rollouts, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        for line in src:
            record = json.loads(line)
            if solutions.get(record["prompt_id"]):
                record["solution"] = solutions[record["prompt_id"]]
                dst.write(json.dumps(record) + "\n")
    return path


def pack_pairs(inputs: list[Path], prefix: Path, tokenizer_dir: Path, cfg: DemoConfig) -> dict:
    from megatron_rift.data.packing import PackConfig, pack_rollouts

    prefix.parent.mkdir(parents=True, exist_ok=True)
    return pack_rollouts(
        PackConfig(
            inputs=[str(p) for p in inputs],
            output_prefix=str(prefix),
            tokenizer=str(tokenizer_dir),
            max_seq_length=cfg.seq_length,
            overlong="drop",
            pairs="ground-truth",
            positive_reward=cfg.positive_reward,
            negative_reward=cfg.negative_reward,
            overwrite=True,
            seed=cfg.seed,
            progress=False,
        )
    )


def export_hf(ckpt: Path, out: Path, log_dir: Path) -> Path:
    """Megatron checkpoint -> HF folder (the trainer's checkpoint carries its tokenizer).

    In this process: the converter reads the checkpoint with a gloo process group of one and builds
    no model, so it leaves nothing behind that touches generation, and it saves the ~9 s a fresh
    interpreter spends importing torch, Megatron-Core and transformers for every model.
    """
    from megatron_rift.convert import ConversionError, convert_megatron_to_hf

    log_path = log_dir / "export.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The loader's warnings go to the log, as a subprocess's would, not through the progress bar.
    with (
        open(log_path, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            result = convert_megatron_to_hf(ckpt, out, overwrite=True, show_progress=False)
        except ConversionError as error:
            raise StageError(f"HF export of {ckpt} failed: {error}") from None
        print(f"wrote {result.output}")
    return out


def sample(
    hf_dir: Path,
    problems: list[Problem],
    cfg: DemoConfig,
    out: Path,
    seed: int,
    show_progress: bool = True,
) -> list[dict]:
    """K samples per problem, verified with the math verifier; written to ``out`` as JSONL."""
    from megatron_rift.demo.task import PROMPT_TEMPLATE
    from megatron_rift.generation import (
        GenerationProblem,
        SamplingConfig,
        generate_rollouts,
        render_question,
        write_jsonl,
    )
    from megatron_rift.rewards import get_verifier

    # Rendered as tools/generate_rollouts.py renders a question, with the demo's own
    # --prompt-template (what its base model is pretrained on; its tokenizer has no chat
    # template): the same text as p.prompt, which the SFT data uses.
    gen_problems = [
        GenerationProblem(
            prompt_id=p.prompt_id,
            prompt=render_question(p.question, prompt_template=PROMPT_TEMPLATE),
            answer=p.answer,
            question=p.question,
        )
        for p in problems
    ]
    records = generate_rollouts(
        hf_dir,
        gen_problems,
        get_verifier("math"),
        SamplingConfig(
            num_samples=cfg.samples_per_problem,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
        ),
        backend="transformers",
        batch_size=64,
        device="cpu",
        show_progress=show_progress,
    )
    write_jsonl(records, out)
    return records


def drop_empty_responses(rollouts: Path) -> tuple[Path, int]:
    """Copy of the rollouts without empty responses (an immediate EOS: scored wrong in evaluation,
    but nothing to train on, and the packer rightly refuses them). Returns (path, number dropped)."""
    out = rollouts.with_name(rollouts.stem + ".trainable.jsonl")
    dropped = 0
    with open(rollouts, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            if json.loads(line)["response"].strip():
                dst.write(line)
            else:
                dropped += 1
    return out, dropped


def save_problems(splits: dict[str, list[Problem]], folder: Path) -> None:
    for split, problems in splits.items():
        write_problems_jsonl(problems, folder / f"{split}.jsonl")
