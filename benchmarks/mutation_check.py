"""Mutation check: break one line on purpose and make sure some test notices.

For each mutation below (one exact string replacement in one source file) this script copies the
repository — the files ``git ls-files -co --exclude-standard`` lists (tracked and untracked, not
ignored), without ``.venv/``, ``runs/`` and ``.git/`` — into a temporary folder, applies the
mutation there, and runs the mutation's pytest selection in the copy with this interpreter
(``sys.executable``, i.e. the project's venv when run as ``.venv/bin/python``):

- CAUGHT       the tests failed (pytest exit status 1): good;
- MISSED       the tests passed: no test guards this line;
- NOT APPLIED  the old string is not in the file (exactly once): the source changed, update the
               mutation (printed loudly);
- ERROR        pytest could not run the selection (collection error, no tests selected, timeout).

Before the mutants, each distinct selection runs once on the unmutated copy (BASELINE): a
selection that fails without a mutation would "catch" everything, so that is an error too.

The working tree is never modified. Exit status 0 only when every mutation is CAUGHT.

    .venv/bin/python benchmarks/mutation_check.py              # all mutations
    .venv/bin/python benchmarks/mutation_check.py --list
    .venv/bin/python benchmarks/mutation_check.py --only heun-euler --only cfg-swap
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDE_TOP = {".venv", "runs", ".git"}


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple  # pytest arguments (files and -k expressions), run with -x -q
    description: str


GUARDS = "tests/test_guards.py"
ORDER = "tests/test_convergence_order.py"
EXACT = "tests/test_exact_scores.py"
VP_SDE = "schedulers/scheduling_vp_sde.py"
PF = "schedulers/scheduling_probability_flow.py"
LANGEVIN = "schedulers/scheduling_annealed_langevin.py"
PARAM = "schedulers/parametrization.py"
SDE_MS = "schedulers/scheduling_sde_multistep.py"
SDE_MS_TESTS = "tests/test_samplers_sde_multistep.py"
PF_SIGMA_TESTS = "tests/test_samplers_pf_ode_sigma.py"
PC_ANC_TESTS = "tests/test_samplers_pc_ancestral.py"
LANGEVIN_TESTS = "tests/test_samplers_langevin.py"
HEUN_2ND = "prev_sample = self._x_i + 0.5 * (self._d_i + drift) * self.dt"
CFG_LINE = "return eps_uncond + guidance_scale * (eps_cond - eps_uncond)"
PATH_TESTS = (GUARDS, "-k", "resolve_checkpoint or (space_mode and not reveal)")

MUTATIONS = [
    # (a) VP-SDE: the last predictor step returns x̄ without noise
    Mutation("vpsde-last-noise", VP_SDE, "prev_sample = x_mean  # noise removal on the last step",
             "prev_sample = x_mean + math.sqrt(beta_t * abs(self.dt)) * self._randn(sample, generator)",
             (GUARDS, "-k", "vp_sde"), "(a) the last VP-SDE step adds noise too"),
    Mutation("vpsde-no-last-case", VP_SDE, "last = i == len(self.timesteps) - 1", "last = False",
             (GUARDS, "-k", "vp_sde"), "(a) the `last` special case dropped"),
    # (b) PF-ODE Heun
    Mutation("heun-euler", PF, HEUN_2ND, "prev_sample = sample + drift * self.dt",
             (ORDER, "-k", "pf_ode"), "(b) Heun's second stage replaced by an Euler step from x'"),
    Mutation("heun-end-slope", PF, HEUN_2ND, "prev_sample = self._x_i + drift * self.dt",
             (ORDER, "-k", "pf_ode"), "(b) no averaging: x_i + d(x', t_{i+1}) Δt (first order)"),
    Mutation("heun-sum-slopes", PF, HEUN_2ND, "prev_sample = self._x_i + (self._d_i + drift) * self.dt",
             (ORDER, "-k", "pf_ode"), "(b) no ½: x_i + (d_i + d') Δt"),
    # (c) training noise per step
    Mutation("train-constant-step", "training/train.py", "step_generator(args.seed, step, self.rank, micro)",
             "step_generator(args.seed, 0, self.rank, micro)",
             (GUARDS, "-k", "training_loop or step_generator"), "(c) every optimizer step seeds its generator alike"),
    Mutation("train-constant-micro", "training/train.py", "step_generator(args.seed, step, self.rank, micro)",
             "step_generator(args.seed, step, self.rank, 0)",
             (GUARDS, "-k", "training_loop or step_generator"), "(c) every micro-batch of a step draws the same noise"),
    Mutation("step-generator-ignores-step", "training/train.py", "step * 7_919", "0 * 7_919",
             (GUARDS, "-k", "training_loop or step_generator"), "(c) step_generator does not depend on the step"),
    # (d) Spaces path guard
    Mutation("path-string-prefix", "pipelines/checkpoint.py", "path.is_relative_to(Path(r).resolve())",
             "str(path).startswith(str(Path(r).resolve()))", PATH_TESTS,
             "(d) string-prefix check: <root>-evil passes"),
    Mutation("path-no-resolve", "pipelines/checkpoint.py", "path = path.resolve()", "path = path.absolute()",
             PATH_TESTS, "(d) '..' and symlinks not resolved before the check"),
    # (e) classifier-free guidance
    Mutation("cfg-swap", PARAM, "eps_cond, eps_uncond = eps.chunk(2)", "eps_uncond, eps_cond = eps.chunk(2)",
             (GUARDS, "-k", "guidance"), "(e) conditional and unconditional branches swapped"),
    Mutation("cfg-no-w", PARAM, CFG_LINE, "return eps_uncond + (eps_cond - eps_uncond)",
             (GUARDS, "-k", "guidance"), "(e) the guidance weight w dropped"),
    Mutation("cfg-w-wrong-term", PARAM, CFG_LINE, "return guidance_scale * eps_uncond + (eps_cond - eps_uncond)",
             (GUARDS, "-k", "guidance"), "(e) w multiplies ε(∅) instead of the difference"),
    Mutation("cfg-null-label", PARAM, "null = torch.full_like(class_labels, self.family.null_class_label)",
             "null = torch.full_like(class_labels, self.family.num_classes)",
             (GUARDS, "-k", "guidance"), "(e) unconditional branch uses num_classes, not family.null_class_label"),
    # more: drift, noise scale and final steps
    Mutation("pf-score-sign", PF, "- 0.5 * beta_t * epsilon_to_score(", "+ 0.5 * beta_t * epsilon_to_score(",
             (ORDER, "-k", "pf_ode"), "PF-ODE drift with the score's sign flipped"),
    Mutation("pf-full-g2", PF, "- 0.5 * beta_t * epsilon_to_score(", "- beta_t * epsilon_to_score(",
             (ORDER, "-k", "pf_ode"), "PF-ODE drift f − g² s (the SDE's) instead of f − ½ g² s"),
    Mutation("vpsde-noise-scale", VP_SDE, "math.sqrt(beta_t * abs(self.dt)) * z",
             "math.sqrt(2 * beta_t * abs(self.dt)) * z", (ORDER, "-k", "vp_sde"),
             "Euler–Maruyama noise √(2β|Δt|) instead of √(β|Δt|)"),
    Mutation("vpsde-score-sign", VP_SDE, "drift = -0.5 * beta_t * sample - beta_t * score",
             "drift = -0.5 * beta_t * sample + beta_t * score", (ORDER, "-k", "vp_sde"),
             "reverse-SDE drift with the score's sign flipped"),
    Mutation("langevin-no-sqrt2", LANGEVIN, "noise_var = 2.0 * step_size_i  # Algorithm 1", "noise_var = step_size_i  # Algorithm 1",
             (LANGEVIN_TESTS, "-k", "algorithm_1 or by_hand"), "Langevin noise √α z instead of √(2α) z"),
    Mutation("langevin-correction-sign", LANGEVIN, "step_size_i * (2.0 - step_size_i / sigma_i**2)",
             "step_size_i * (2.0 + step_size_i / sigma_i**2)", (LANGEVIN_TESTS, "-k", "by_hand or 16d"),
             "noise correction α(2 + δ) instead of α(2 − δ)"),
    Mutation("sde-ms-midpoint", SDE_MS, "(D_i - D_prev) / (2.0 * r_i)", "(D_i - D_prev) / r_i",
             (SDE_MS_TESTS,), "SDE multistep: extrapolation (D_i − D_{i−1})/r instead of /(2r)"),
    Mutation("sde-ms-noise", SDE_MS, "math.sqrt(-math.expm1(-2.0 * eta * h_i))", "math.sqrt(-math.expm1(-eta * h_i))",
             (SDE_MS_TESTS,), "SDE multistep: noise σ√(1 − e^{−ηh}) instead of σ√(1 − e^{−2ηh})"),
    Mutation("sde-ms-decay", SDE_MS, "math.exp(-(1.0 + eta) * h_i)", "math.exp(-(1.0 + 2.0 * eta) * h_i)",
             (SDE_MS_TESTS,), "SDE multistep: decay e^{−(1+2η)h} instead of e^{−(1+η)h}"),
    Mutation("pc-anc-var", VP_SDE, "noise_std = std_s * math.sqrt(beta_ts) / std_t", "noise_std = math.sqrt(beta_ts)",
             (PC_ANC_TESTS,), "PC ancestral predictor: noise √β_{t|s} (the paper's) instead of the posterior's √β̃"),
    Mutation("pc-anc-mean", VP_SDE, "(m_ts * std_s**2 / std_t**2) * sample", "(std_s**2 / std_t**2) * sample",
             (PC_ANC_TESTS,), "PC ancestral predictor: the posterior mean's x_t coefficient without m_{t|s}"),
    Mutation("pc-anc-next", VP_SDE, "next_times = grid[1:].repeat_interleave(C + 1)",
             "next_times = grid[:-1].repeat_interleave(C + 1)", (PC_ANC_TESTS,),
             "PC ancestral predictor: lands on the step's own time instead of the next grid time"),
    Mutation("pf-sigma-heun", PF, "x_next = self._x_i + 0.5 * (self._d_i + d) * d_sigma", "x_next = self._x_i + d * d_sigma",
             (PF_SIGMA_TESTS,), "PF-ODE in σ: Heun's corrector uses the end slope only"),
    Mutation("pf-sigma-scale", PF, "return self._finish(i, m_end * x_next, x0, return_dict)",
             "return self._finish(i, self._m[i] * x_next, x0, return_dict)", (PF_SIGMA_TESTS,),
             "PF-ODE in σ: the VE state handed back with the start's m(t) instead of the end's"),
    Mutation("langevin-no-tweedie", LANGEVIN, "prev_sample = pred_original_sample  # NCSNv2 final denoising step",
             "prev_sample = sample  # NCSNv2 final denoising step", (GUARDS, "-k", "langevin"),
             "annealed Langevin's final Tweedie step removed"),
    Mutation("pf-no-tweedie", PF,
             "if i >= self._num_ode_entries:  # final denoising step at t_ε\n            prev_sample = pred_original_sample",
             "if i >= self._num_ode_entries:  # final denoising step at t_ε\n            prev_sample = sample",
             (GUARDS, "-k", "pf_ode"), "PF-ODE's final Tweedie step at t_ε removed"),
]


def repo_files(root: Path) -> list:
    """Tracked and untracked, non-ignored files (read-only git), minus .venv/, runs/ and .git/."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    files = []
    for rel in out.split("\0"):
        if not rel or rel.split("/", 1)[0] in EXCLUDE_TOP:
            continue
        path = root / rel
        if path.is_file() or path.is_symlink():  # listed but deleted in the working tree: skip
            files.append(rel)
    return files


def snapshot(root: Path, dest: Path) -> int:
    files = repo_files(root)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target, follow_symlinks=False)
    return len(files)


def env_for(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale bytecode between the pristine and the mutated copies
    return env


def check_imports_from(copy: Path) -> None:
    """The copy must import its own modules, not the working tree's (e.g. through an editable install)."""
    code = ("import sys, schedulers, pipelines, training; "
            "print('\\n'.join(m.__file__ for m in (schedulers, pipelines, training)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"mutation_check: the copy does not import:\n{out.stderr}")
    for path in out.stdout.split():
        if not Path(path).resolve().is_relative_to(copy.resolve()):
            sys.exit(f"mutation_check: the copy imports {path}, outside the copy; mutations would not apply")


def run_pytest(copy: Path, tests: tuple, timeout: int) -> tuple:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.time()
    try:
        out = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout, check=False)
        return out.returncode, out.stdout + out.stderr, time.time() - start
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, text, time.time() - start


def verdict(rc) -> str:
    return {0: "MISSED", 1: "CAUGHT"}.get(rc, "ERROR")


def first_failure(text: str) -> str:
    """The first ``FAILED …`` line of pytest's short summary: which test caught the mutant, and why."""
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:160]
    return ""


def tail(text: str, n: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs of each selection")
    p.add_argument("--show", action="store_true", help="print the test that caught each mutation")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = p.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            p.error(f"unknown mutation(s) {unknown}; --list shows the names")
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:28} {m.file:42} {' '.join(m.tests)}\n{'':28} {m.description}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    try:
        pristine = work / "pristine"
        n = snapshot(ROOT, pristine)
        print(f"copied {n} files of {ROOT} to {pristine}")
        check_imports_from(pristine)

        failures = []
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in mutations):
                rc, out, secs = run_pytest(pristine, tests, args.timeout)
                status = "ok" if rc == 0 else f"FAILS (rc={rc})"
                print(f"BASELINE {' '.join(tests):70} {status} ({secs:.0f} s)")
                if rc != 0:
                    failures.append(f"baseline {' '.join(tests)}")
                    print(tail(out))

        rows = []
        for m in mutations:
            source = (pristine / m.file).read_text() if (pristine / m.file).exists() else None
            count = source.count(m.old) if source is not None else 0
            if count != 1:
                why = ("file missing" if source is None else
                       "old string not found" if count == 0 else f"old string found {count}×")
                print(f"\n!!!!!!!! NOT APPLIED: {m.name}: {why} in {m.file}: "
                      "the source changed; update the mutation !!!!!!!!\n")
                rows.append((m, "NOT APPLIED", 0.0))
                continue
            copy = work / m.name
            shutil.copytree(pristine, copy, symlinks=True)
            (copy / m.file).write_text(source.replace(m.old, m.new))
            rc, out, secs = run_pytest(copy, m.tests, args.timeout)
            result = verdict(rc)
            rows.append((m, result, secs))
            print(f"{m.name:28} {result:11} ({secs:.0f} s)")
            if result != "CAUGHT":
                print(tail(out))
            elif args.show:
                print(f"    {first_failure(out)}")
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)

        print()
        header = f"{'mutation':28} {'file':42} {'result':11} {'time':>6}  description"
        print(header)
        print("-" * len(header))
        for m, result, secs in rows:
            print(f"{m.name:28} {m.file:42} {result:11} {secs:5.0f}s  {m.description}")
        missed = [m.name for m, result, _ in rows if result != "CAUGHT"]
        print()
        print(f"{sum(r == 'CAUGHT' for _, r, _ in rows)}/{len(rows)} mutations caught")
        if missed:
            print(f"NOT CAUGHT: {', '.join(missed)}")
        if failures:
            print(f"BASELINE FAILURES: {', '.join(failures)}")
        return 0 if not missed and not failures else 1
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
