"""The end-to-end demo for one seed: task -> tokenizer -> base model -> rollouts -> every method -> scores.

Folder layout under the demo's output directory (``seed{N}/``)::

    problems/{base,train,val,test,ood}.jsonl   the task
    tokenizer/                                 trained on the task's text
    data/{base,expert,rollouts,positives}.*    packed datasets (Megatron .bin/.idx + rewards)
    base/ckpt, base/hf                         the base model (Megatron checkpoint and its HF export)
    rollouts/train.jsonl                       K verified samples per train problem from the base
    methods/<name>/{ckpt,hf,eval}              each fine-tuned model and its scored generations
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

from megatron_rift.demo import stages
from megatron_rift.demo.base_selection import select_base_checkpoint
from megatron_rift.demo.competence import competence_report
from megatron_rift.demo.config import DEFAULT_METHOD_LR, DemoConfig
from megatron_rift.demo.methods import VARIANTS, DemoMethod, demo_method, naive_at
from megatron_rift.demo.task import Problem, generate_splits, load_problems_file, task_texts
from megatron_rift.demo.tokenizer import train_demo_tokenizer
from megatron_rift.evaluation import evaluate_files, read_outcomes, results_dict
from megatron_rift.objectives import NAIVE, RIFT, SFT

EVAL_SPLITS = ("test", "ood")


def _source(method: str) -> str:
    """The demo dataset a method (an objective's or a variant's name) trains on."""
    return demo_method(method).dataset()


def method_lr(lrs: dict, method: DemoMethod) -> float:
    """A method's lr: its own, else its objective's (variants), else the demo's default."""
    return lrs.get(method.name, lrs.get(method.objective, DEFAULT_METHOD_LR))


def build_splits(cfg: DemoConfig, seed: int) -> dict[str, list[Problem]]:
    if cfg.problems_file is None:
        return generate_splits(
            seed=seed,
            sizes={
                "base": cfg.base_problems,
                "train": cfg.train_problems,
                "val": cfg.val_problems,
                "test": cfg.test_problems,
                "ood": cfg.ood_problems,
            },
        )
    problems = load_problems_file(cfg.problems_file)
    splits: dict[str, list[Problem]] = {
        s: [p for p in problems if p.split == s] for s in ("train", "val", "test", "ood")
    }
    # A user's file has no pretraining split: half of the train problems that carry a solution
    # pretrain the tiny base, the rest are post-training problems (as the built-in task keeps
    # "base" and "train" apart).
    with_solution = [p for p in splits["train"] if p.solution]
    random.Random(seed).shuffle(with_solution)
    splits["base"] = with_solution[: len(with_solution) // 2]
    base_ids = {p.prompt_id for p in splits["base"]}
    splits["train"] = [p for p in splits["train"] if p.prompt_id not in base_ids]
    if not splits["val"]:
        splits["val"] = splits["train"][: max(1, len(splits["train"]) // 5)]
    for needed in ("base", "train", "test"):
        if not splits[needed]:
            raise ValueError(
                f"{cfg.problems_file}: the demo needs {needed!r} problems "
                "(train records with a 'solution' pretrain the base; add split "
                "'train' and 'test' records)"
            )
    return splits


def evaluate_model(
    hf_dir: Path,
    splits: dict[str, list[Problem]],
    names: tuple[str, ...],
    cfg: DemoConfig,
    out: Path,
    method: str,
    seed: int,
) -> dict:
    """Sample K per problem on each split in ``names``; Mean@K / Pass@K per split."""
    paths = []
    for split in names:
        if splits.get(split):
            path = out / f"{split}.jsonl"
            stages.sample(hf_dir, splits[split], cfg, path, seed=seed + 1000, show_progress=False)
            paths.append(path)
    result = results_dict(
        evaluate_files(paths, k=cfg.samples_per_problem), cfg.samples_per_problem, method
    )
    # Each problem's share of correct samples, for the paired statistics (demo/statistics.py).
    result["per_problem"] = {
        split: {key: sum(samples) / len(samples) for key, samples in problems.items()}
        for split, problems in read_outcomes(paths).items()
    }
    return result


def swept_methods(methods) -> list[str]:
    """The methods ``--sweep-lr`` gives a rate of their own: the objectives as registered. A RIFT
    variant (divergent negatives, table 6's rewards) trains at RIFT's rate, as the paper's
    ablations do, and the naive loss at RIFT's rate too: the point is what the unbounded loss does
    where the bounded one works."""
    return [m for m in methods if m not in VARIANTS and m != NAIVE.name]


class DemoRun:
    """One seed of the demo. ``run()`` returns ``{method: results_dict}`` plus data statistics."""

    def __init__(self, cfg: DemoConfig, seed: int, folder: Path):
        self.cfg, self.seed, self.dir = cfg, seed, folder
        self.timings: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.base_selection: dict | None = None

    def _stage(self, bar, name: str):
        bar.set_description(f"seed {self.seed}: {name}")
        self.timings[name] = time.perf_counter()

    def _done(self, bar, name: str):
        self.timings[name] = round(time.perf_counter() - self.timings[name], 1)
        bar.update(1)

    def run(self) -> dict:
        cfg, d = self.cfg, self.dir
        methods = list(cfg.methods)
        total = 4 + len(methods) + (1 if cfg.sweep_lr else 0) + (1 if cfg.rounds > 1 else 0)
        total += len(cfg.naive_collapse_lrs) + 1 if NAIVE.name in methods else 0
        with tqdm(total=total, unit="stage", dynamic_ncols=True) as bar:
            self._stage(bar, "task + tokenizer")
            splits = build_splits(cfg, self.seed)
            stages.save_problems(splits, d / "problems")
            tok = train_demo_tokenizer(
                task_texts(p for s in splits.values() for p in s), d / "tokenizer"
            )
            self._done(bar, "task + tokenizer")

            self._stage(bar, "base model")
            base_ckpt = self._pretrain_base(splits, tok)
            base_hf = stages.export_hf(base_ckpt, d / "base" / "hf", d / "base")
            self._done(bar, "base model")

            self._stage(bar, "rollouts")
            rollouts = d / "rollouts" / "train.jsonl"
            stages.sample(base_hf, splits["train"], cfg, rollouts, seed=self.seed)
            data = self._pack_post_training(splits, rollouts, tok)
            for name in sorted({_source(m) for m in methods if demo_method(m).spec.reference}):
                if data.get(name) is not None:  # the base scores them once (DPO/KTO reference)
                    stages.compute_ref_logprobs(base_ckpt, data[name], cfg, d / "base")
            self.competence = competence_report(self.data_stats, self.seed)
            tqdm.write(self.competence["message"])
            self._done(bar, "rollouts")

            self._stage(bar, "evaluate base")
            results = {
                "base": evaluate_model(
                    base_hf, splits, EVAL_SPLITS, cfg, d / "base" / "eval", "base", self.seed
                )
            }
            self._done(bar, "evaluate base")

            lrs = dict(cfg.method_lr)
            if cfg.sweep_lr:
                self._stage(bar, "lr sweep (validation split)")
                lrs.update(self._sweep(splits, data, base_ckpt, methods))
                self._done(bar, "lr sweep (validation split)")

            for method in methods:
                self._stage(bar, method)
                if data[_source(method)] is None:
                    self.skipped[method] = "the base produced no correct rollout to train on"
                else:
                    results[method] = self._finetune_and_evaluate(
                        method,
                        method_lr(lrs, demo_method(method)),
                        data,
                        base_ckpt,
                        splits,
                        d / "methods" / method,
                    )
                self._done(bar, method)

            for variant, lr in self._collapse_runs(lrs, data):
                self._stage(bar, variant.name)
                results[variant.name] = self._finetune_and_evaluate(
                    variant, lr, data, base_ckpt, splits, d / "methods" / variant.name
                )
                self._done(bar, variant.name)

            if cfg.rounds > 1 and RIFT.name in methods:
                self._stage(bar, f"{RIFT.name} round 2")
                results[f"{RIFT.name} (round 2)"] = self._second_round(
                    splits, tok, method_lr(lrs, demo_method(RIFT.name))
                )
                self._done(bar, f"{RIFT.name} round 2")
        per_problem = {m: r.pop("per_problem") for m, r in results.items() if "per_problem" in r}
        return {
            "results": results,
            "per_problem": per_problem,
            "competence": {k: v for k, v in self.competence.items() if k != "message"},
            "base_selection": self.base_selection,
            "lrs": lrs,
            "data": self.data_stats,
            "timings_s": self.timings,
            "skipped": self.skipped,
        }

    def _pretrain_base(self, splits, tok: Path) -> Path:
        """The base model's checkpoint root, its tracker on the chosen checkpoint."""
        cfg, d = self.cfg, self.dir
        problems, holdout = splits["base"], []
        if cfg.base_competence_ceiling is not None:
            n = min(cfg.base_holdout_problems, len(problems) // 2)
            problems, holdout = problems[: len(problems) - n], problems[len(problems) - n :]
        base_data = d / "data" / "base"
        records = stages.write_sft_records(problems, d / "records" / "base.jsonl", "model")
        stages.pack([records], base_data, tok, cfg)
        base_ckpt = d / "base" / "ckpt"
        stages.train(
            cfg,
            base_data,
            base_ckpt,
            SFT.name,
            cfg.base_lr,
            cfg.base_epochs,
            cfg.base_global_batch,
            d / "base",
            save_interval=cfg.base_checkpoint_interval if holdout else None,
        )
        if holdout:
            self.base_selection = select_base_checkpoint(
                base_ckpt, holdout, cfg, self.seed, d / "base" / "selection"
            )
            s = self.base_selection
            tqdm.write(
                f"seed {self.seed}: base = step {s['chosen_iteration']} of "
                f"{s['final_iteration']}, the newest checkpoint with at most "
                f"{100 * s['ceiling']:.0f}% of held-out samples right "
                f"({', '.join(f'step {k}: {100 * v:.1f}%' for k, v in s['held_out_competence'].items())})"
            )
        return base_ckpt

    def _pack_post_training(self, splits, rollouts: Path, tok: Path) -> dict[str, Path]:
        cfg, d = self.cfg, self.dir
        expert = stages.write_sft_records(splits["train"], d / "records" / "expert.jsonl", "expert")
        data = {
            "expert": d / "data" / "expert",
            "rollouts": d / "data" / "rollouts",
            "positives": d / "data" / "positives",
            "pairs": d / "data" / "pairs",
        }
        stages.pack([expert], data["expert"], tok, cfg)
        trainable, empty = stages.drop_empty_responses(rollouts)
        if any(_source(m) == "pairs" for m in cfg.methods):
            paired = stages.write_pair_records(
                trainable, splits["train"], d / "records" / "pairs.jsonl"
            )
            stages.pack_pairs([paired], data["pairs"], tok, cfg)
        self.data_stats = stages.pack([trainable], data["rollouts"], tok, cfg)
        self.data_stats["empty_responses_dropped"] = empty
        if self.data_stats.get("positive", 0) > 0:
            stages.pack([trainable], data["positives"], tok, cfg, keep="positive")
        else:
            data["positives"] = None  # RFT has nothing to train on: recorded, not an error
        for method in map(demo_method, cfg.methods):  # the table-6 variants' own rewards
            name = method.dataset()
            if name not in data:
                data[name] = d / "data" / name
                stages.pack(
                    [trainable],
                    data[name],
                    tok,
                    cfg,
                    reward_scheme=method.reward_scheme,
                    negative_reward=method.negative_reward,
                )
        return data

    def _collapse_runs(self, lrs: dict, data: dict) -> list[tuple[DemoMethod, float]]:
        """The naive loss at RIFT's lr (when its own differs) and at ``naive_collapse_lrs``: where
        it collapses, for the plot's loss curves."""
        if NAIVE.name not in self.cfg.methods or data.get("rollouts") is None:
            return []
        own = method_lr(lrs, demo_method(NAIVE.name))
        wanted = [method_lr(lrs, demo_method(RIFT.name)), *self.cfg.naive_collapse_lrs]
        runs: list[tuple[DemoMethod, float]] = []
        for lr in wanted:
            if lr != own and all(lr != other for _, other in runs):
                runs.append((naive_at(lr), lr))
        return runs

    def _finetune_and_evaluate(
        self, method, lr, data, start_ckpt, splits, folder: Path, eval_splits=EVAL_SPLITS
    ) -> dict:
        spec = method if isinstance(method, DemoMethod) else demo_method(method)
        ckpt = folder / "ckpt"
        stages.train(
            self.cfg,
            data[spec.dataset()],
            ckpt,
            spec.objective,
            lr,
            self.cfg.finetune_epochs,
            self.cfg.finetune_global_batch,
            folder,
            pretrained=start_ckpt,
            negative_mode=spec.negative_mode,
        )
        hf = stages.export_hf(ckpt, folder / "hf", folder)
        result = evaluate_model(
            hf, splits, eval_splits, self.cfg, folder / "eval", spec.name, self.seed
        )
        result["lr"] = lr
        return result

    def _sweep(self, splits, data, base_ckpt, methods) -> dict[str, float]:
        """Each method's lr by validation Mean@K (never the test splits)."""
        chosen = {}
        for method in swept_methods(methods):
            if data[_source(method)] is None:
                continue
            scores = {
                lr: self._val_score(method, lr, data, base_ckpt, splits)
                for lr in self.cfg.sweep_lrs
            }
            # A best rate at the grid's edge is extended past it (x or / sqrt(10)), so the chosen
            # rate is bracketed; at most sweep_extensions more rates per method.
            for _ in range(self.cfg.sweep_extensions):
                best = max(scores, key=scores.get)
                if min(scores) < best < max(scores) or len(scores) < 2:
                    break
                lr = best * 10**0.5 if best == max(scores) else best / 10**0.5
                scores[lr] = self._val_score(method, lr, data, base_ckpt, splits)
            chosen[method] = max(scores, key=scores.get)
            (self.dir / "sweep").mkdir(exist_ok=True)
            with open(self.dir / "sweep" / "scores.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {"method": method, "val_mean_at_k": scores, "chosen_lr": chosen[method]}
                    )
                    + "\n"
                )
        if NAIVE.name in methods and RIFT.name in chosen:
            chosen[NAIVE.name] = chosen[RIFT.name]  # item 5 of issue 19: naive at RIFT's rate
        return chosen

    def _val_score(self, method: str, lr: float, data, base_ckpt, splits) -> float:
        folder = self.dir / "sweep" / f"{method}_lr{lr:g}"
        result = self._finetune_and_evaluate(
            method, lr, data, base_ckpt, splits, folder, eval_splits=("val",)
        )
        return result["average"]["mean_at_k"]

    def _second_round(self, splits, tok: Path, lr: float) -> dict:
        """Iterative RIFT (paper appendix A.2): new rollouts from the round-1 RIFT model, train again."""
        d = self.dir / "round2"
        first = self.dir / "methods" / RIFT.name
        rollouts = d / "rollouts.jsonl"
        stages.sample(first / "hf", splits["train"], self.cfg, rollouts, seed=self.seed + 1)
        data = {"rollouts": d / "data" / "rollouts"}
        stages.pack([stages.drop_empty_responses(rollouts)[0]], data["rollouts"], tok, self.cfg)
        return self._finetune_and_evaluate(
            RIFT.name, lr, data, first / "ckpt", splits, d / RIFT.name
        )
