"""Every bad input we know of, through the real command line in this process: one sentence on
stderr naming what is wrong, exit status 2, no traceback, and no file of an existing run changed.

`python tests/test_bad_input.py` prints the table of cases with the sentence each one gets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import pytest
import torch

from progvae.__main__ import main

QUICK = ["--steps=2", "--log_every=1", "--checkpoint_every=0", "--n_grid=4", "--quiet=True"]
STAGE1 = ["stage1", "--config=digits", "--distortion_target=0.02", *QUICK]
# a run that keeps its checkpoints (checkpoints/step_*.pt), and a kept one
KEEPING = ["stage1", "--config=digits", "--distortion_target=0.02", "--steps=2",
           "--log_every=1", "--checkpoint_every=1", "--keep_checkpoints=2", "--n_grid=4",
           "--eval_every=1", "--quiet=True"]
KEPT_FILE = "checkpoints/step_00000001.pt"

# (what is wrong, the command with {run} = a finished stage-one run and {tmp} = a scratch
# folder, a word the sentence must contain)
CASES = [
    ("zero steps", [*STAGE1, "--out={run}", "--steps=0"], "'steps'"),
    ("negative steps", [*STAGE1, "--out={run}", "--steps=-5"], "'steps'"),
    ("steps not a number", [*STAGE1, "--out={run}", "--steps=lots"], "steps"),
    ("EMA rate above 1", [*STAGE1, "--out={run}", "--ema_rate=5"], "'ema_rate'"),
    ("log_every 0", [*STAGE1, "--out={run}", "--log_every=0"], "'log_every'"),
    ("eval_batch_size 0", [*STAGE1, "--out={run}", "--eval_batch_size=0"], "'eval_batch_size'"),
    ("n_grid 0", [*STAGE1, "--out={run}", "--n_grid=0"], "'n_grid'"),
    ("accumulate 0", [*STAGE1, "--out={run}", "--accumulate=0"], "'accumulate'"),
    ("width 0", [*STAGE1, "--out={run}", "--width=0"], "'width'"),
    ("batch size 0", [*STAGE1, "--out={run}", "--batch_size=0"], "'batch_size'"),
    ("batch larger than the data", [*STAGE1, "--out={run}", "--batch_size=100000"],
     "batch_size"),
    ("unknown precision", [*STAGE1, "--out={run}", "--precision=fp16"], "'precision'"),
    ("unknown controller", [*STAGE1, "--out={run}", "--controller=nosuch"], "controller"),
    ("NaN learning rate", [*STAGE1, "--out={run}", "--lr=nan"], "'lr'"),
    ("infinite target", [*STAGE1, "--out={run}", "--distortion_target=inf"],
     "distortion_target"),
    ("zero target", [*STAGE1, "--out={run}", "--distortion_target=0"], "distortion"),
    ("negative target", [*STAGE1, "--out={run}", "--distortion_target=-0.5"], "distortion"),
    ("negative grad_clip", [*STAGE1, "--out={run}", "--grad_clip=-1"], "'grad_clip'"),
    ("--resume_from a step not kept", [*STAGE1, "--out={run}", "--resume_from=1"],
     "keeps none"),
    ("--resume_from negative", [*STAGE1, "--out={run}", "--resume_from=-3"], "--resume_from"),
    ("--keep_checkpoints negative", [*STAGE1, "--out={run}", "--keep_checkpoints=-1"],
     "'keep_checkpoints'"),
    ("misspelt field", [*STAGE1, "--out={run}", "--wdith=3"], "wdith"),
    ("unknown preset", ["stage1", "--config=nosuch", "--out={run}"], "nosuch"),
    ("changed architecture", [*STAGE1, "--out={run}", "--width=16"], "width"),
    ("config JSON that is a list", ["stage1", "--config={tmp}/list.json", "--out={run}"],
     "list.json"),
    ("config JSON with Infinity", ["stage1", "--config={tmp}/infinite.json", "--out={run}"],
     "distortion_target"),
    ("config file not JSON", ["stage1", "--config={tmp}/broken.json", "--out={run}"],
     "broken.json"),
    ("stray positional argument", [*STAGE1, "extra", "--out={run}"], "extra"),
    ("--out a number", [*STAGE1, "--out=123", "--data=folder:{tmp}/missing"], "missing"),
    ("--out is a file", [*STAGE1, "--out={tmp}/list.json"], "is a file"),
    ("--out cannot be created", [*STAGE1, "--out=/proc/progvae/run"], "cannot be created"),
    ("no --out", [*STAGE1], "--out"),
    ("missing data folder", [*STAGE1, "--out={tmp}/new", "--data=folder:{tmp}/missing"],
     "missing"),
    ("unknown data spec", [*STAGE1, "--out={tmp}/new", "--data=nosuch:x"], "nosuch"),
    ("symlink loop in a folder dataset", [*STAGE1, "--out={tmp}/new",
                                          "--data=folder:{tmp}/loop"], "symbolic link loop"),
    ("empty image folder", [*STAGE1, "--out={tmp}/new", "--data=folder:{tmp}/empty"], "empty"),
    ("an unreadable image", [*STAGE1, "--out={tmp}/new", "--data=folder:{tmp}/unreadable"],
     "broken.png"),
    ("images of the wrong size", [*STAGE1, "--out={tmp}/new", "--data=folder:{tmp}/sized"],
     "20x20"),
    ("resume: planted payload", [*STAGE1, "--out={tmp}/payload"], "never unpickles code"),
    ("sample: no such run", ["sample", "--run={tmp}/missing", "--out={tmp}/s.png"], "missing"),
    ("sample: no checkpoint", ["sample", "--run={tmp}/empty", "--out={tmp}/s.png"],
     "checkpoint"),
    ("sample: negative temperature", ["sample", "--run={run}", "--temperature=-1",
                                      "--out={tmp}/s.png"], "temperature"),
    ("sample: temperature not a number", ["sample", "--run={run}", "--temperature=abc",
                                          "--out={tmp}/s.png"], "temperature"),
    ("sample: n 0", ["sample", "--run={run}", "--n=0", "--out={tmp}/s.png"], "--n"),
    ("sample: batch size 0", ["sample", "--run={run}", "--batch_size=0", "--out={tmp}/s.png"],
     "batch_size"),
    ("sample: seed not a number", ["sample", "--run={run}", "--seed=abc", "--out={tmp}/s.png"],
     "seed"),
    ("sample: --out not a .png", ["sample", "--run={run}", "--out={tmp}/s.jpg"], ".png"),
    ("sample: --out a number", ["sample", "--run={run}", "--out=123"], ".png"),
    ("sample: --out not writable", ["sample", "--run={run}", "--out=/proc/progvae/s.png"],
     "/proc/progvae"),
    ("sample: --npz not .npz", ["sample", "--run={run}", "--out={tmp}/s.png",
                                "--npz={tmp}/s.txt"], ".npz"),
    ("sample: planted payload", ["sample", "--run={tmp}/payload", "--out={tmp}/s.png"],
     "refuses"),
    ("sample: truncated checkpoint", ["sample", "--run={tmp}/truncated", "--out={tmp}/s.png"],
     "truncated"),
    ("sample: NaN weights", ["sample", "--run={tmp}/nan", "--out={tmp}/s.png"], "NaN"),
    ("export: no --run", ["export", "--out={tmp}/m.safetensors"], "--run"),
    ("export: --out not .safetensors", ["export", "--run={run}", "--out={tmp}/m.pt"],
     ".safetensors"),
    ("export: NaN weights", ["export", "--run={tmp}/nan", "--out={tmp}/m.safetensors"], "NaN"),
    ("exported: not a safetensors file", ["sample", "--run={tmp}/garbage.safetensors",
                                          "--out={tmp}/s.png"], "not a readable safetensors"),
    ("exported: a header claiming 400 GB", ["sample", "--run={tmp}/huge.safetensors",
                                            "--out={tmp}/s.png"], "not a readable safetensors"),
    ("exported: another program's safetensors", ["evaluate", "--run={tmp}/foreign.safetensors"],
     "not a progvae model"),
    ("exported: weights that do not fit the config", ["sample", "--run={tmp}/misfit.safetensors",
                                                      "--out={tmp}/s.png"], "do not fit"),
    ("exported: missing file", ["stage2", "--stage1={tmp}/missing.safetensors",
                                "--out={tmp}/s2", *QUICK], "does not exist"),
    ("evaluate: no --run", ["evaluate"], "--run"),
    ("evaluate: unknown metric", ["evaluate", "--run={run}", "--metrics=nosuch"], "nosuch"),
    ("evaluate: unknown split", ["evaluate", "--run={run}", "--split=val"], "--split"),
    ("evaluate: n_samples 0", ["evaluate", "--run={run}", "--n_samples=0"], "n_samples"),
    ("evaluate: missing Inception weights", ["evaluate", "--run={run}", "--metrics=fid",
                                             "--inception_weights={tmp}/missing.pth"],
     "missing.pth"),
    ("evaluate: Inception weights with a planted payload",
     ["evaluate", "--run={run}", "--metrics=fid",
      "--inception_weights={tmp}/payload/checkpoint.pt"], "refuses to load"),
    ("evaluate: LPIPS weights with a planted payload",
     ["evaluate", "--run={run}", "--metrics=lpips",
      "--lpips_weights={tmp}/payload/checkpoint.pt"], "refuses to load"),
    ("evaluate: FID statistics with a planted payload",
     ["evaluate", "--run={run}", "--metrics=fid", "--fid_stats={tmp}/payload_stats.npz"],
     "not floating point"),
    ("evaluate: --fid_stats without the fid metric",
     ["evaluate", "--run={run}", "--metrics=mse", "--fid_stats={tmp}/payload_stats.npz"],
     "add fid"),
    ("evaluate: --fid_stats not an .npz", ["evaluate", "--run={run}", "--metrics=fid",
                                           "--fid_stats={tmp}/list.json"],
     "not usable FID statistics"),
    ("stage2: no --stage1", ["stage2", "--out={tmp}/s2", *QUICK], "--stage1"),
    ("stage2: missing stage one", ["stage2", "--stage1={tmp}/missing", "--out={tmp}/s2",
                                   *QUICK], "missing"),
    ("evaluate: planted payload", ["evaluate", "--run={tmp}/payload", "--metrics=mse"],
     "never unpickles code"),
    ("evaluate: NaN weights", ["evaluate", "--run={tmp}/nan", "--metrics=mse"], "NaN"),
    ("stage2: stage one with a planted payload", ["stage2", "--stage1={tmp}/payload",
                                                  "--out={tmp}/s2", *QUICK],
     "never unpickles code"),
    ("stage2: stage one with NaN weights", ["stage2", "--stage1={tmp}/nan", "--out={tmp}/s2",
                                            *QUICK], "NaN"),
    ("report: --out is a file", ["report", "--runs={run}", "--out={tmp}/list.json"],
     "is a file"),
    ("report: no such run", ["report", "--runs={tmp}/missing", "--out={tmp}/report"],
     "missing"),
    ("progressive: not a vdvae run", ["progressive", "--run={run}", "--out={tmp}/p"],
     "vdvae"),
    ("data: no --data", ["data"], "--data"),
    ("bench: the GPU suite without a GPU", ["bench", "--suite=gpu", "--out={tmp}/g.json"],
     "needs a CUDA GPU"),
    ("bench: unknown suite", ["bench", "--suite=nosuch", "--out={tmp}/g.json"],
     "one of step, gpu, codec"),
    ("a stray word where a number goes", ["sample", "stray", "--run={run}", "--out={tmp}/s.png"],
     "Unexpected argument 'stray'"),
    ("bench: unknown model", ["bench", "--model=nosuch", "--out={tmp}/b.json"],
     "one of stage1, stage2, joint, vdvae"),
    ("evaluate: unknown split", ["evaluate", "--run={run}", "--split=valid"],
     "one of test, train"),
    ("compress: no such quality", ["compress", "--images={run}/samples.png", "--out={tmp}/c",
                                   "--quality=9"], "one of 1, 2, 3"),
    ("a preset that is not UTF-8", [*STAGE1, "--config={tmp}/latin1.json", "--out={tmp}/o"],
     "latin1.json' is not UTF-8"),
    ("report: a progressive table.md that is not UTF-8",
     ["report", "--runs={tmp}/progressive", "--out={tmp}/report"], "table.md' is not UTF-8"),
    ("data: unknown dataset", ["data", "--data=mnist", "--out={tmp}/p.png"],
     "one of digits, patches, photos, folder:PATH"),
]


def make_scratch(tmp: Path, run: Path) -> None:
    """The files the cases name: broken configs, a symlink loop, damaged copies of the run."""
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "infinite.json").write_text('{"distortion_target": Infinity}')
    (tmp / "broken.json").write_text('{"steps": ')
    (tmp / "latin1.json").write_bytes('{"data": "caf\xe9"}'.encode("latin-1"))
    (tmp / "progressive").mkdir()   # a progressive experiment's folder, its table.md damaged
    (tmp / "progressive" / "table.json").write_text('{"data": "patches", "R_K": 0.006}')
    (tmp / "progressive" / "table.md").write_bytes(b"\xff\xfe| R_K |")
    (tmp / "empty").mkdir()
    loop = tmp / "loop"
    (loop / "inner").mkdir(parents=True)
    for index in range(4):
        imageio.imwrite(loop / f"{index}.png", np.zeros((16, 16), np.uint8))
    (loop / "inner" / "back").symlink_to(loop, target_is_directory=True)
    for name, size in (("unreadable", 16), ("sized", 20)):
        (tmp / name).mkdir()
        for index in range(3):
            imageio.imwrite(tmp / name / f"{index}.png", np.zeros((size, size), np.uint8))
    (tmp / "unreadable" / "broken.png").write_bytes(b"not a png at all")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for name in ("payload", "truncated", "nan"):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_bytes((run / "config.json").read_bytes())
    (tmp / "payload" / "checkpoint.pt").write_bytes(_planted_payload(tmp / "ran"))
    (tmp / "truncated" / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:999])
    state["ema"] = {name: torch.full_like(value, float("nan")) if value.is_floating_point()
                    else value for name, value in state["ema"].items()}
    torch.save(state, tmp / "nan" / "checkpoint.pt")
    _exported_files(tmp, run)
    np.savez(tmp / "payload_stats.npz", mu=np.array([_Payload(tmp / "ran")], dtype=object),
             sigma=np.eye(1))


def _exported_files(tmp: Path, run: Path) -> None:
    """Damaged and foreign safetensors files."""
    from safetensors.torch import save_file

    (tmp / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    header = json.dumps({"x": {"dtype": "F32", "shape": [100_000_000_000],
                               "data_offsets": [0, 400_000_000_000]}}).encode()
    (tmp / "huge.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    save_file({"x": torch.zeros(3)}, str(tmp / "foreign.safetensors"))
    with contextlib.redirect_stdout(io.StringIO()):
        main(["export", f"--run={run}", f"--out={tmp / 'misfit.safetensors'}"])
    from safetensors import safe_open
    with safe_open(str(tmp / "misfit.safetensors"), framework="pt") as stream:
        metadata = stream.metadata()
        tensors = {name: stream.get_tensor(name) for name in stream.keys()}
    config = json.loads(metadata["config"])
    config["width"] = 2 * config["width"]
    save_file(tensors, str(tmp / "misfit.safetensors"),
              metadata={**metadata, "config": json.dumps(config)})


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _planted_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"stage": "stage1", "step": 2, "ema": _Payload(marker)}, buffer)
    return buffer.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(argv: list[str], run: Path, tmp: Path) -> tuple[int, str, bool]:
    """The exit status, what was printed to stderr, and whether the run's files changed."""
    argv = [part.format(run=run, tmp=tmp) for part in argv]
    before = snapshot(run)
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    return code, stderr.getvalue().strip(), snapshot(run) != before


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny stage-one run and the scratch folder of the cases."""
    run = tmp_path_factory.mktemp("runs") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        main([*STAGE1, f"--out={run}"])
    tmp = tmp_path_factory.mktemp("scratch")
    make_scratch(tmp, run)
    return run, tmp


@pytest.mark.parametrize("what, argv, needle", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(scratch, what, argv, needle):
    run, tmp = scratch
    code, message, changed = run_case(argv, run, tmp)
    assert code == 2, message
    assert "Traceback" not in message
    message = message[message.find("progvae: error:"):]   # after any progress bar
    assert message.startswith("progvae: error:") and "\n" not in message, message
    assert needle in message, message
    assert not changed
    assert not (tmp / "ran").exists()          # a planted payload never runs


# Files progvae wrote earlier and reads back, damaged one at a time in a copy of a finished
# run: every command that reads the file says so in one sentence (exit 2, no traceback, the
# copy unchanged) or, where the file is optional, carries on (exit 0).
DAMAGES = {
    "missing": None,
    "empty": b"",
    "truncated": lambda original: original[:len(original) // 2],
    "not UTF-8": b"\xff\xfe\x00{\x80",
    "wrong type": b"[1, 2, 3]\n",
    "hand-edited": "hand-edited",   # a field of the wrong type, per file below
}
HAND_EDITS = {"checkpoint.pt": ("step", "many"), "config.json": ("width", "wide"),
              "summary.json": ("mse", "low"),
              "eval.json": ("elbo", "high"), "metrics.jsonl": ("step", "first"),
              "heldout.jsonl": ("mse", "low"), KEPT_FILE: ("step", "many")}
# (file, command with {run} = the damaged copy and {tmp} = a scratch folder, damages after
# which the command may carry on)
READERS = [
    ("checkpoint.pt", ["sample", "--run={run}", "--out={tmp}/s.png", "--n=4"], ()),
    ("checkpoint.pt", ["evaluate", "--run={run}", "--metrics=mse"], ()),
    ("checkpoint.pt", ["export", "--run={run}", "--out={tmp}/m.safetensors"], ()),
    ("checkpoint.pt", ["stage2", "--stage1={run}", "--out={tmp}/s2", *QUICK], ()),
    ("checkpoint.pt", [*STAGE1, "--out={run}"], ("missing",)),   # killed before its first
    ("config.json", ["sample", "--run={run}", "--out={tmp}/s.png", "--n=4"], ()),
    ("config.json", ["evaluate", "--run={run}", "--metrics=mse"], ()),
    ("config.json", ["export", "--run={run}", "--out={tmp}/m.safetensors"], ()),
    ("config.json", ["plot", "--run={run}", "--out={tmp}/c.png"], ("missing", "hand-edited")),
    ("config.json", ["report", "--runs={run}", "--out={tmp}/report"], ("hand-edited",)),
    ("config.json", ["stage2", "--stage1={run}", "--out={tmp}/s2", *QUICK], ()),
    ("config.json", [*STAGE1, "--out={run}"], ("missing",)),
    ("summary.json", ["plot", "--run={run}", "--out={tmp}/c.png"], ("missing",)),
    ("summary.json", ["report", "--runs={run}", "--out={tmp}/report"], ("missing",)),
    ("summary.json", ["export", "--run={run}", "--out={tmp}/m.safetensors"], ("missing",)),
    ("summary.json", ["stage2", "--stage1={run}", "--out={tmp}/s2", *QUICK], ("missing",)),
    ("metrics.jsonl", ["plot", "--run={run}", "--out={tmp}/c.png"],
     ("empty", "truncated", "not UTF-8", "wrong type", "hand-edited")),
    ("eval.json", ["evaluate", "--run={run}", "--metrics=mse"], ("missing",)),
    ("eval.json", ["report", "--runs={run}", "--out={tmp}/report"], ("missing",)),
    # the held-out log is drawn where readable, like metrics.jsonl
    ("heldout.jsonl", ["plot", "--run={run}", "--out={tmp}/c.png"], tuple(DAMAGES)),
    (KEPT_FILE, [*KEEPING, "--out={run}", "--resume_from=1"], ()),
]
# The default suite damages each file under its first reader above; `-m slow` adds the rest
# of the matrix (about 100 cases, about 25 s).
FIRST_READERS = {file: argv for file, argv, _ in reversed(READERS)}
DAMAGED = [pytest.param(file, how, argv, how in optional, id=f"{file} {how}: {argv[0]}",
                        marks=() if FIRST_READERS[file] is argv else pytest.mark.slow)
           for file, argv, optional in READERS for how in DAMAGES]


def damage(run: Path, file: str, how: str) -> None:
    path = run / file
    if how == "missing":
        path.unlink()
    elif how == "hand-edited":
        field, value = HAND_EDITS[file]
        if file.endswith(".pt"):
            state = torch.load(path, weights_only=True)
            torch.save({**state, field: value}, path)
        elif file.endswith(".jsonl"):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({**line, field: value}) + "\n" for line in lines))
        else:
            path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    else:
        change = DAMAGES[how]
        path.write_bytes(change(path.read_bytes()) if callable(change) else change)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """A finished stage-one run with an eval.json, a heldout.jsonl and kept checkpoints, the
    original every damaged copy starts from."""
    original = tmp_path_factory.mktemp("evaluated") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        main([*KEEPING, f"--out={original}"])
        main(["evaluate", f"--run={original}", "--metrics=mse"])
    assert (original / "heldout.jsonl").is_file() and (original / KEPT_FILE).is_file()
    return original


@pytest.mark.parametrize("file, how, argv, may_carry_on", DAMAGED)
def test_a_damaged_file_of_a_run_is_one_sentence_naming_it(evaluated_run, tmp_path, file, how,
                                                           argv, may_carry_on):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    damage(run, file, how)
    before = snapshot(run)
    (tmp_path / "scratch").mkdir()
    code, message, _ = run_case(argv, run, tmp_path / "scratch")
    assert "Traceback" not in message, message
    if code == 0:
        assert may_carry_on, f"carried on with a {how} {file}"
        return
    assert code == 2, message
    message = message[message.find("progvae: error:"):]
    assert message.startswith("progvae: error:") and "\n" not in message, message
    assert file in message or how == "missing", message
    assert snapshot(run) == before


def test_non_finite_results_are_flagged_and_written_as_valid_json(tmp_path, capsys):
    from progvae.core.atomic import atomic_write_json, flag_non_finite

    flagged = flag_non_finite({"elbo": float("nan"), "mse": 0.5, "fid": float("inf"),
                               "kind": "stage2"}, "summary.json")
    assert flagged == {"elbo": None, "mse": 0.5, "fid": None, "kind": "stage2",
                       "non_finite": ["elbo", "fid"]}
    assert "non-finite values (elbo, fid)" in capsys.readouterr().err
    atomic_write_json({"nested": [float("nan"), 1.0], "x": float("-inf")}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"nested": [None, 1.0], "x": None}
    assert flag_non_finite({"mse": 0.5}, "summary.json") == {"mse": 0.5}


if __name__ == "__main__":   # the table of the closing note
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        run, tmp = Path(folder) / "run", Path(folder) / "scratch"
        with contextlib.redirect_stdout(io.StringIO()):
            main([*STAGE1, f"--out={run}"])
        tmp.mkdir()
        make_scratch(tmp, run)
        print("| # | input | sentence printed | exit | run changed |")
        print("|---|---|---|---|---|")
        for number, (what, argv, _) in enumerate(CASES, 1):
            code, message, changed = run_case(argv, run, tmp)
            shown = " ".join(argv).replace(" ".join(QUICK), "…")
            message = message.replace(str(folder), "…").replace("|", "\\|")
            print(f"| {number} | {what}: `{shown}` | {message} | {code} | "
                  f"{'yes' if changed else 'no'} |")
        sys.exit(0)
