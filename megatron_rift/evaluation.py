"""Mean@k and Pass@k from scored generations, per benchmark and averaged, as in the RIFT paper.

Input: JSONL files of scored generations (what ``tools/generate_rollouts.py`` writes), one record per
sample with ``prompt_id`` (or ``question``/``prompt``) naming the problem and ``correct`` (bool) or
``reward`` (number; correct when > 0). A file is one benchmark (named by its stem) unless a field
(e.g. ``split``) names the benchmark of each record.

* Mean@k: the mean over problems of the fraction of correct samples (c / n) — the expected accuracy
  of one sample, estimated from all n samples.
* Pass@k: the mean over problems of the unbiased estimator of Chen et al. (2021),
  ``1 - C(n - c, k) / C(n, k)``: the chance that at least one of k samples drawn without
  replacement from the n is correct. With n == k it is simply "any of the k is correct".
The benchmark average is the unweighted mean over benchmarks (the paper's "Avg." column).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from megatron_rift.jsonl import iter_json_objects

_PROBLEM_KEYS = ("prompt_id", "question", "prompt")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct (0 <= c <= n, 1 <= k <= n).

    ``1 - C(n-c, k) / C(n, k)`` evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms
    the (huge) binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclasses.dataclass
class BenchmarkScore:
    name: str
    num_problems: int
    num_samples: int  # total samples (records)
    mean_at_k: float  # fractions in [0, 1]
    pass_at_k: float


class RecordError(ValueError):
    """A bad generation record; the message names the file and line."""


def _record_correct(record: dict, where: str) -> bool:
    if "correct" in record and record["correct"] is not None:
        if not isinstance(record["correct"], (bool, int)) or record["correct"] not in (0, 1):
            raise RecordError(
                f"{where}: field 'correct' must be true/false, got {record['correct']!r}"
            )
        return bool(record["correct"])
    reward = record.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or math.isnan(reward):
        raise RecordError(f"{where}: needs field 'correct' (true/false) or a numeric 'reward'")
    return reward > 0


def _problem_key(record: dict, where: str) -> str:
    for key in _PROBLEM_KEYS:
        if record.get(key) is not None:
            return f"{key}:{record[key]}"
    raise RecordError(
        f"{where}: needs a field naming its problem: one of {', '.join(_PROBLEM_KEYS)}"
    )


def read_outcomes(
    paths: Iterable[str | Path], benchmark_field: str | None = None
) -> dict[str, dict[str, list[bool]]]:
    """Read generation files -> ``{benchmark: {problem_key: [correct, ...]}}`` (benchmarks in first-seen
    order). Raises RecordError (file:line) on a bad record."""
    outcomes: dict[str, dict[str, list[bool]]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise RecordError(f"{path}: no such file")
        count = 0
        for _, where, record in iter_json_objects(path, RecordError):
            if benchmark_field is None:
                benchmark = path.stem
            elif record.get(benchmark_field) is None:
                raise RecordError(f"{where}: missing the benchmark field {benchmark_field!r}")
            else:
                benchmark = str(record[benchmark_field])
            problems = outcomes.setdefault(benchmark, defaultdict(list))
            problems[_problem_key(record, where)].append(_record_correct(record, where))
            count += 1
        if count == 0:
            raise RecordError(f"{path}: no records (the file is empty)")
    return {name: dict(problems) for name, problems in outcomes.items()}


def score_benchmark(name: str, problems: dict[str, list[bool]], k: int) -> BenchmarkScore:
    """Mean@k and Pass@k of one benchmark; every problem needs at least k samples."""
    short = [(key, len(samples)) for key, samples in problems.items() if len(samples) < k]
    if short:
        key, n = short[0]
        raise ValueError(
            f"benchmark {name!r}: problem {key} has {n} samples, fewer than k={k} "
            f"({len(short)} problem(s) short); generate more samples or lower --k"
        )
    means = [sum(samples) / len(samples) for samples in problems.values()]
    passes = [pass_at_k(len(samples), sum(samples), k) for samples in problems.values()]
    return BenchmarkScore(
        name,
        len(problems),
        sum(len(s) for s in problems.values()),
        sum(means) / len(means),
        sum(passes) / len(passes),
    )


def evaluate_files(
    paths: Iterable[str | Path], k: int = 8, benchmark_field: str | None = None
) -> list[BenchmarkScore]:
    outcomes = read_outcomes(paths, benchmark_field)
    return [score_benchmark(name, problems, k) for name, problems in outcomes.items()]


def average(scores: list[BenchmarkScore]) -> dict[str, float]:
    """Unweighted mean over benchmarks of Mean@k and Pass@k."""
    return {
        "mean_at_k": sum(s.mean_at_k for s in scores) / len(scores),
        "pass_at_k": sum(s.pass_at_k for s in scores) / len(scores),
    }


def results_dict(scores: list[BenchmarkScore], k: int, method: str) -> dict:
    """JSON-ready results: ``{"method", "k", "benchmarks": {name: {...}}, "average": {...}}``."""
    return {
        "method": method,
        "k": k,
        "benchmarks": {s.name: dataclasses.asdict(s) for s in scores},
        "average": average(scores),
    }


def markdown_table(results: list[dict], metric: str) -> str:
    """A paper-style table (rows: methods, columns: benchmarks + Avg.) of one metric in percent.

    ``results`` are :func:`results_dict` outputs; ``metric`` is ``"mean_at_k"`` or ``"pass_at_k"``.
    """
    if metric not in ("mean_at_k", "pass_at_k"):
        raise ValueError(f"metric must be 'mean_at_k' or 'pass_at_k', got {metric!r}")
    names: list[str] = []
    for result in results:
        names += [name for name in result["benchmarks"] if name not in names]
    ks = {result["k"] for result in results}
    label = ("Mean" if metric == "mean_at_k" else "Pass") + (
        f"@{ks.pop()}" if len(ks) == 1 else "@k"
    )
    lines = [
        f"| Method ({label}) | " + " | ".join(names) + " | Avg. |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for result in results:
        cells = []
        for name in names:
            score = result["benchmarks"].get(name)
            cells.append(f"{100 * score[metric]:.1f}" if score else "-")
        cells.append(f"{100 * result['average'][metric]:.1f}")
        lines.append(f"| {result['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
