"""Mutation testing of torchcvt's numeric core with mutmut: one module at a time, against fast tests.

    python tools/mutation.py layers            # one module; several; `all`; --list for the names and tests
    python tools/mutation.py steps data --seconds 600     # a time bound per module
    python tools/mutation.py layers --recheck             # each survivor of the last run, one at a time

Each module is mutated in its own scratch copy (default /tmp/torchcvt-mutation/MODULE, kept, so a rerun only
tests what changed) and its mutants run against the tests named below. Prints the count of each outcome, the
kill rate (killed and timed out over all mutants checked) and the survivors; docs/testing.md reports them.
--recheck applies each survivor of a module's last run by hand to a fresh copy of src/ and runs the module's
whole selection on it in a new pytest process: mutmut's batch verdict on a constructor has been seen to
differ from a run of the mutant alone. Its verdicts (recheck.json in the scratch copy) count in the report.
Needs the `dev` extra (mutmut). Not installed with the package.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARITY = "tests/test_numeric_parity.py::"
# The official-layout reference at fp32, both kernels and both activations; the MLP alone; the key names.
OFFICIAL = [f"{PARITY}test_official_layout_file_gives_the_reference_logits[{kernel}-{activation}-fp32]"
            for kernel in ("fused", "plain") for activation in ("quick_gelu", "gelu")]
# The same under bf16 autocast: the casts, and the float32 residual stream behind a class token.
OFFICIAL_BF16 = [name.replace("-fp32]", "-bf16]") for name in OFFICIAL]
MLP = [f"{PARITY}test_fused_and_plain_mlp_blocks_agree_with_the_formula"]
# Autograd's path against the reference: logits, every gradient and BatchNorm's statistics after a step.
GRADIENTS = [f"{PARITY}test_with_gradients_the_logits_gradients_and_statistics_are_the_references"]
# The ablation's 'avg' and 'linear' projections against the reference.
PROJECTIONS = [f"{PARITY}test_the_ablations_projections_give_the_reference_logits"]
# A Linear replaced by another module (LoRA, quantization) is called, not bypassed by a fast path.
REPLACED = [f"{PARITY}test_a_replaced_linear_is_called_on_every_path"]
KEYS = [f"{PARITY}test_official_key_names_and_shapes_are_the_official_module_trees"]
POOL_POS = [f"{PARITY}test_without_a_class_token_the_mean_of_the_normed_tokens_is_classified",
            f"{PARITY}test_position_embedding_is_added_and_resized_to_the_grid"]
# bf16 attention in blocks of query rows (fused.attention) and the bf16 optimized model that runs it.
ATTENTION = ["tests/test_inference.py"]
# The training path: the MLP's recomputed activation, checkpointing without a second statistics update.
TRAINING = [f"tests/test_fast.py::{name}" for name in (
    "test_fast_training_path_equals_plain", "test_folded_batchnorm_is_conv_then_bn_with_gradients",
    "test_grad_checkpointing_gives_same_grads_and_statistics",
    "test_grad_checkpointing_updates_syncbatchnorm_statistics_once")]
# Attention maps agree with the output; no layout copies; the norms' eps; autocast dtypes; empty batches;
# dropout (attention, projection, MLP) and stochastic depth in training.
LAYOUT = ["tests/test_fast.py::test_fast_paths_keep_state_dict_and_attention_maps",
          "tests/test_fast.py::test_convolutions_take_the_token_layout_as_it_is",
          *(f"tests/test_model.py::{name}" for name in (
              "test_layer_norm_eps_reaches_every_norm_and_the_logits",
              "test_class_token_stage_runs_in_float32_under_autocast_as_the_official_code",
              "test_empty_batch_gives_empty_logits",
              "test_attention_dropout_alone_drops_attention_weights_in_training",
              "test_eval_ignores_the_dropout_rates_and_training_applies_them",
              "test_projection_dropout_in_training_keeps_the_residual",
              "test_mlp_dropout_in_training_is_the_formula_with_its_gradients",
              "test_a_block_in_training_adds_each_branch_through_stochastic_depth",
              "test_stochastic_depth_rises_linearly_per_stage"))]
HF = [f"{PARITY}test_transformers_weights_give_transformers_logits[{kernel}-fp32]"
      for kernel in ("fused", "plain")]

# module -> (file to mutate, the fast tests that check its numbers, mutant-name patterns or None for all).
# The patterns keep data.py to its sampler and transforms (its folder walking and writing are not numeric).
TARGETS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "layers": ("src/torchcvt/layers.py",
               [*OFFICIAL, *OFFICIAL_BF16, *MLP, *GRADIENTS, *PROJECTIONS, *REPLACED, *ATTENTION, *TRAINING,
                *LAYOUT, "tests/test_weightcache.py",
                "tests/test_fast.py::test_mlp_in_row_blocks_equals_the_whole_mlp"], None),
    # With test_model.py: pooling, initialisation, norms and the input checks, beside the numbers.
    "model": ("src/torchcvt/model.py",
              [*OFFICIAL, *GRADIENTS, *PROJECTIONS, *KEYS, *POOL_POS, "tests/test_model.py",
               "tests/test_fast.py::test_convolutions_take_the_token_layout_as_it_is"], None),
    # The kernel's paths; its first-use self-check (_check, _matches_plain) is the target fused-check.
    "fused": ("src/torchcvt/fused.py", [*OFFICIAL, *OFFICIAL_BF16, *MLP, *ATTENTION],
              [f"torchcvt.fused.x_{name}__*" for name in ("linear", "_call", "_guarded", "fused_dtype",
                                                          "fused_linear_enabled", "set_fused_linear",
                                                          "plain_ops_only", "attention",
                                                          "blocked_attention")]),
    "fused-check": ("src/torchcvt/fused.py", [*OFFICIAL, *MLP, "tests/test_fused_check.py"],
                    ["torchcvt.fused.x__check__*", "torchcvt.fused.x__matches_plain__*"]),
    # Both directions of the transformers conversion (weights and config.json), and what files record.
    "formats": ("src/torchcvt/weights/formats.py",
                [*HF, *KEYS, "tests/test_parity_hf.py", "tests/test_checkpoint_metadata.py",
                 "tests/test_hf_export.py::test_preprocessor_config_reproduces_the_eval_transform",
                 "tests/test_hf_export.py::test_an_interpolation_without_a_pil_filter_is_named"], None),
    # With the files that load a checkpoint of another variant, dtype or channel count into a model.
    "load": ("src/torchcvt/weights/load.py",
             [*OFFICIAL[:2], "tests/test_weights_checkpoint.py", "tests/test_checkpoint_metadata.py",
              "tests/test_weights_hub.py", "tests/test_factory.py"], None),
    "steps": ("src/torchcvt/engine/steps.py", ["tests/test_steps.py"], None),
    "data": ("src/torchcvt/data.py", ["tests/test_data_numbers.py"],
             ["torchcvt.data.xǁResizeCenterCropǁ*", "torchcvt.data.x_eval_transform__*",
              "torchcvt.data.xǁSeededSamplerǁ*", "torchcvt.data.xǁShardSamplerǁ*",
              "torchcvt.data.x_train_transform__*",
              "torchcvt.data.x__posterize*", "torchcvt.data.x_collate_skipping_bad__*"]),
}
KILLED = ("killed", "timeout", "segfault")  # a crashed test process noticed the mutant too


def _prepare(workdir: Path, path: str, tests: list[str]) -> None:
    """A scratch copy of src/ and tests/ with a pyproject.toml that points mutmut at one file."""
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in ("src", "tests"):
        shutil.copytree(ROOT / folder, workdir / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    config = "\n".join([
        "[tool.mutmut]",
        'source_paths = ["src/"]',
        f'only_mutate = ["{path}"]',
        f"pytest_add_cli_args_test_selection = {tests!r}",
        'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]',
        # torch's thread pools do not survive a fork from a process that ran tests: fork from a server
        # that only collected them. A generous constant: a shared machine's load, not a mutant, is slow.
        'process_isolation = "forkserver"',
        "timeout_constant = 60.0",
    ]).replace("'", '"')
    (workdir / "pyproject.toml").write_text(config + "\n")


def _results(workdir: Path, patterns: list[str] | None) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir,
                         capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"^\s+(\S+): (.+)$", out, flags=re.MULTILINE))
    if patterns:
        regexes = [re.compile(re.escape(p).replace(r"\*", ".*")) for p in patterns]
        found = {name: status for name, status in found.items() if any(r.fullmatch(name) for r in regexes)}
    return found


def run(module: str, seconds: int, workdir: Path, children: int) -> dict[str, str]:
    path, tests, patterns = TARGETS[module]
    _prepare(workdir, path, tests)
    (workdir / "recheck.json").unlink(missing_ok=True)  # verdicts on the code and tests of an earlier run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *(patterns or [])]
    with open(workdir / "mutmut.log", "w") as log:
        # A session of its own, so that the time bound also stops mutmut's forked test runners.
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=log,
                                   start_new_session=True)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            print(f"{module}: stopped after {seconds} s; the mutants not yet run count as 'not checked'")
    return _results(workdir, patterns)


def _function_lines(source: str, name: str) -> tuple[int, int, int]:
    """(first line, last line, indent) of the function a mutant name points at (x_f or xǁClassǁmethod)."""
    function = name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    scope, wanted = (function[2:].split("ǁ") if function.startswith("xǁ") else (None, function[2:]))
    tree = ast.parse(source)
    body = next((node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == scope),
                []) if scope else tree.body
    node = next(node for node in body if isinstance(node, ast.FunctionDef) and node.name == wanted)
    return node.lineno, node.end_lineno, node.col_offset


def _apply(diff: str, source: str, name: str) -> str:
    """source with mutmut's diff of one function applied. mutmut shows the function dedented (a docstring's
    lines as they are), so its lines are matched without their indentation."""
    hunk = [(line[:1] or " ", line[1:]) for line in diff.split("@@", 2)[2].split("\n", 1)[1].splitlines()]
    while hunk and not hunk[-1][1].strip():
        hunk.pop()
    before = [text.strip() for kind, text in hunk if kind != "+"]
    first, last, indent = _function_lines(source, name)
    lines = source.split("\n")
    starts = [i for i in range(first - 1, last - len(before) + 1)
              if [line.strip() for line in lines[i:i + len(before)]] == before]
    if len(starts) != 1:
        raise SystemExit(f"{name}: its diff does not apply to today's code")
    at, mutated = starts[0], []
    for kind, text in hunk:
        if kind == "+":
            mutated.append(" " * indent + text)
        else:
            if kind == " ":
                mutated.append(lines[at])
            at += 1
    return "\n".join(lines[:starts[0]] + mutated + lines[at:])


def _run_selection(tests: list[str], path: str | None = None, source: str | None = None) -> tuple[int, str]:
    """pytest's exit code and output for the tests, run on a fresh copy of src/ with path's text replaced."""
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        if path is not None:
            (Path(scratch) / path).write_text(source)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
        result = subprocess.run([*command, *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    return result.returncode, result.stdout


def recheck(module: str, workdir: Path, jobs: int) -> dict[str, str]:
    """Each survivor of the module's last run, applied by hand, against the whole selection in a fresh
    pytest process; the verdicts are kept in workdir/recheck.json (a rerun checks only what survived)."""
    path, tests, patterns = TARGETS[module]
    source = (ROOT / path).read_text()
    if not (workdir / path).exists():
        raise SystemExit(f"no run of {module} in {workdir}: run `python tools/mutation.py {module}` first")
    if (workdir / path).read_text() != source:
        raise SystemExit(f"{workdir / path} is not today's {path}: run `{module}` again first")
    # Any failure of a mutant then counts as its detection, a test's or an import's.
    code, output = _run_selection(tests)
    if code:
        raise SystemExit(f"{module}'s selection fails on today's code:\n{output[-2000:]}")
    verdicts_file = workdir / "recheck.json"
    verdicts = json.loads(verdicts_file.read_text()) if verdicts_file.exists() else {}
    names = [name for name, status in _results(workdir, patterns).items()
             if status not in (*KILLED, "not checked") and verdicts.get(name) != "killed"]
    lock = threading.Lock()

    def check(name: str) -> None:
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir,
                              capture_output=True, text=True, check=True).stdout
        code, _ = _run_selection(tests, path, _apply(diff, source, name))
        with lock:  # kept as they come, so that a stopped recheck loses nothing
            verdicts[name] = "killed" if code else "survived"
            verdicts_file.write_text(json.dumps(verdicts, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {verdicts[name]}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(check, names))
    return verdicts


def _with_rechecks(workdir: Path, results: dict[str, str]) -> dict[str, str]:
    verdicts_file = workdir / "recheck.json"
    verdicts = json.loads(verdicts_file.read_text()) if verdicts_file.exists() else {}
    return {name: verdicts.get(name, status) for name, status in results.items()}


def report(module: str, results: dict[str, str]) -> None:
    counts = Counter(results.values())
    checked = sum(n for status, n in counts.items() if status not in ("not checked", "skipped"))
    killed = sum(counts[s] for s in KILLED)
    rate = f"{100 * killed / checked:.1f}%" if checked else "n/a"
    outcomes = ", ".join(f"{status} {n}" for status, n in counts.items())
    print(f"{module}: {killed}/{checked} killed ({rate}); {outcomes}")
    for name, status in sorted(results.items()):
        if status not in KILLED:
            print(f"    {name}: {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"{', '.join(TARGETS)} or all")
    parser.add_argument("--seconds", type=int, default=3600, help="time bound per module")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/torchcvt-mutation"))
    parser.add_argument("--children", type=int, default=1, help="mutants run at once")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests")
    parser.add_argument("--recheck", action="store_true",
                        help="rerun each survivor of the last run alone against the whole selection")
    args = parser.parse_args()
    if args.list or not args.modules:
        for name, (path, tests, _) in TARGETS.items():
            print(f"{name}: {path} <- {' '.join(tests)}")
        return
    unknown = set(args.modules) - {*TARGETS, "all"}
    if unknown:
        parser.error(f"unknown module(s) {sorted(unknown)}: choose from {', '.join(TARGETS)} or all")
    for module in TARGETS if "all" in args.modules else args.modules:
        workdir = args.workdir / module
        if args.recheck:
            recheck(module, workdir, args.children)
            results = _results(workdir, TARGETS[module][2])
        else:
            results = run(module, args.seconds, workdir, args.children)
        report(module, _with_rechecks(workdir, results))


if __name__ == "__main__":
    main()
