"""The ``async-ckpt`` command on real checkpoints written by ``CheckpointManager``.

One module fixture writes them once: a one-process run (steps 10, 20, 30), a zstd run, a run
with tied weights, a staging leftover left by a save killed before it published (a real child
process with a fault point), and three 2-rank pipeline-style runs (PER_RANK model, one stage per
rank) made with ``run_ranks``. Tests that damage a run work on a copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from async_ckpt import CheckpointManager, StateComponent, rng_component
from async_ckpt.cli import main
from async_ckpt.cli.bench import find_benchmarks
from async_ckpt.layout import MANIFEST_NAME
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed  # the runs it inspects are made by real gloo ranks and child processes

COMMANDS = ("list", "inspect", "verify", "clean", "export", "bench")
ROOT = Path(__file__).resolve().parents[2]


class Net(torch.nn.Module):
    """Two layers; stage r of the pipeline runs holds ``layers.r.*`` under its full names."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Tied(torch.nn.Module):
    """An embedding and an output layer that share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class Stage:
    """A Stateful over some of a model's tensors, keyed as given."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.tensors[name].copy_(value)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _components(model: Net) -> list[StateComponent]:
    """Model, optimizer (with momentum state after one step) and RNG."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return [StateComponent("model", model, required=True), StateComponent("optimizer", optimizer), rng_component()]


def _pipeline_ranks(rank: int, world_size: int, root: str) -> None:
    """Each rank saves its stage of ``Net``: full names, then stage-relative names that clash."""
    full = _net().state_dict()
    mine = {k: v for k, v in full.items() if k.startswith(f"layers.{rank}.")}
    torch.manual_seed(100 + rank)
    relative = torch.nn.Linear(4, 4).state_dict()  # "weight", "bias" on both ranks, other values
    for name, state, options in (
        ("pp", mine, {"compression": "zstd"}),
        ("pp_pt", mine, {"file_format": "torch"}),
        ("pp_clash", relative, {}),
    ):
        fmt = options.pop("file_format", "safetensors")
        comps = [StateComponent("model", Stage(state), sharing_pattern="per_rank", required=True, file_format=fmt),
                 StateComponent("optimizer", Stage({"m": torch.full((2,), float(rank))}), sharing_pattern="per_rank"), rng_component()]
        with CheckpointManager(Path(root) / name, comps, async_save=False, **options) as mgr:
            mgr.save(5)


_KILLED_SAVE = """
import sys, torch
from async_ckpt import CheckpointManager, StateComponent
model = torch.nn.Linear(4, 3)
CheckpointManager(sys.argv[1], [StateComponent("model", model, required=True)]).save(40).wait()
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    with CheckpointManager(root / "run", _components(_net())) as mgr:
        for step in (10, 20, 30):
            mgr.save(step)
    with CheckpointManager(root / "zstd", _components(_net()), compression="zstd") as mgr:
        mgr.save(7)
    for fmt in ("safetensors", "torch"):
        with CheckpointManager(root / f"tied_{fmt}", [StateComponent("model", Tied(), required=True, file_format=fmt)]) as mgr:
            mgr.save(1)
    shutil.copytree(root / "run", root / "crashed")
    env = {**os.environ, "ASYNC_CKPT_FAULTS": "before_publish:kill", "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root / "crashed")], env=env, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()
    run_ranks(_pipeline_ranks, 2, str(root), timeout=120)
    return root


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """Run ``async-ckpt argv`` in this process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def copy(made: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made / name, tmp_path / name))


def flip_byte(path: Path, at: int | None = None) -> None:
    """Change one byte, keeping the size (the middle one by default)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def rows(out: str) -> dict[str, list[str]]:
    """A printed table as {first column: cells}."""
    return {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}


def age(path: Path, seconds: float) -> None:
    """Make a directory and its entries look untouched for ``seconds``."""
    then = time.time() - seconds
    for p in [*path.iterdir(), path]:
        os.utime(p, (then, then), follow_symlinks=False)


# ---------------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_subcommand(capsys, command):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    assert f"usage: async-ckpt {command}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["list"], ["verify", "x", "--threads", "many"], ["clean", "x", "--keep"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2, argv
        assert "usage: async-ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["list", "nowhere"], ["inspect", "nowhere"], ["verify", "nowhere"], ["clean", "nowhere"],
                                  ["export", "nowhere", "out"]])
def test_expected_errors_are_one_line_on_stderr(capsys, tmp_path, argv):
    code, out, err = cli(capsys, *[tmp_path / a if a != argv[0] else a for a in argv])
    assert code == 1 and out == ""
    assert err.startswith(f"async-ckpt {argv[0]}: error: ") and "Traceback" not in err and err.count("\n") == 1


def test_console_script_entry_point():
    child = subprocess.run([sys.executable, "-m", "async_ckpt.cli", "--version"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert child.returncode == 0 and child.stdout.startswith("async-ckpt ")


# ---------------------------------------------------------------------------------------- list


def test_list_marks_the_newest_as_resume(capsys, made):
    code, out, err = cli(capsys, "list", made / "run")
    table = rows(out)
    assert code == 0 and err == ""
    assert out.splitlines()[0].split() == ["name", "step", "state", "size", "age", "world"]
    assert list(table) == ["checkpoint-30", "checkpoint-20", "checkpoint-10"]
    assert table["checkpoint-30"][2] == "committed" and table["checkpoint-30"][-2:] == ["<-", "resume"]
    assert "resume" not in " ".join(table["checkpoint-20"])


def test_list_json(capsys, made):
    code, out, _ = cli(capsys, "list", made / "run", "--json")
    entries = json.loads(out)
    assert code == 0 and [e["step"] for e in entries] == [30, 20, 10]
    assert [e["resume"] for e in entries] == [True, False, False]
    assert entries[0]["world_size"] == 1 and entries[0]["size_bytes"] > 0 and entries[0]["state"] == "committed"


def _damage(run: Path, how: str) -> None:
    newest = run / "checkpoint-30"
    if how == "truncated":
        (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:-3])
    elif how == "manifest":
        (newest / MANIFEST_NAME).write_text("{not json")
    elif how == "no_manifest":
        (newest / MANIFEST_NAME).unlink()
    elif how == "required_missing":
        (newest / "model.safetensors").unlink()
    elif how == "optional_missing":
        (newest / "optimizer_state.pt").unlink()
    elif how == "flipped":  # the last byte: tensor data, so the file still parses
        flip_byte(newest / "model.safetensors", -1)


@pytest.mark.parametrize("how, state, picked", [
    ("truncated", "damaged", 20), ("manifest", "damaged", 20), ("no_manifest", "damaged", 20),
    ("required_missing", "damaged", 20), ("optional_missing", "partial", 30),
    ("flipped", "committed", 30),  # list checks sizes only: verify finds this one
])
def test_list_states_match_what_resume_does(capsys, made, tmp_path, how, state, picked):
    run = copy(made, "run", tmp_path)
    _damage(run, how)
    code, out, _ = cli(capsys, "list", run, "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert code == 0 and entries["checkpoint-30"]["state"] == state
    assert [e["step"] for e in entries.values() if e["resume"]] == [picked]
    if state == "damaged":
        assert entries["checkpoint-30"]["note"]
    # what the manager itself picks, with hashes off so that it checks what list checks
    with CheckpointManager(run, _components(_net()), verify_on_load=False) as mgr:
        assert mgr.load(strict=False).step == picked


def test_list_shows_why_a_checkpoint_is_damaged(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    _damage(run, "truncated")
    (run / "checkpoint-20" / "optimizer_state.pt").unlink()
    _, out, _ = cli(capsys, "list", run)
    assert "wrong size: model.safetensors" in out
    assert "missing: optimizer_state.pt" in out


def test_list_shows_staging_leftovers(capsys, made):
    code, out, _ = cli(capsys, "list", made / "crashed")
    staging = [line for line in out.splitlines() if line.startswith(".checkpoint-40.staging-")]
    assert code == 0 and len(staging) == 1 and " staging " in staging[0]
    assert rows(out)["checkpoint-30"][-1] == "resume"


def test_list_empty_directory(capsys, tmp_path):
    code, out, err = cli(capsys, "list", tmp_path)
    assert code == 0 and out == "" and "no checkpoints" in err
    assert cli(capsys, "list", tmp_path, "--json")[1].strip() == "[]"


def test_list_refuses_a_checkpoint(capsys, made):
    code, _, err = cli(capsys, "list", made / "run" / "checkpoint-10")
    assert code == 1 and "pass its parent" in err


# ------------------------------------------------------------------------------------- inspect


def test_inspect_table(capsys, made):
    code, out, _ = cli(capsys, "inspect", made / "zstd" / "checkpoint-7")
    assert code == 0
    assert "step 7, world size 1, 3 files" in out.splitlines()[0]
    for header in ("component  pattern", "file", "rank"):
        assert any(line.startswith(header) for line in out.splitlines()), header
    files = {line.split()[0]: line.split() for line in out.splitlines() if ".zst" in line}
    assert set(files) == {"model.safetensors.zst", "optimizer_state.pt.zst", "rng_state.pt.zst"}
    assert all("zstd" in cells for cells in files.values())
    assert any(line.startswith("model ") and "global" in line and "yes" in line and "safetensors" in line for line in out.splitlines())
    assert "stall ms" in out and "persist ms" in out


def test_inspect_json_is_the_manifest(capsys, made):
    checkpoint = made / "run" / "checkpoint-20"
    code, out, _ = cli(capsys, "inspect", checkpoint, "--json")
    shown, raw = json.loads(out), json.loads((checkpoint / MANIFEST_NAME).read_text())
    assert code == 0 and shown["step"] == 20
    assert shown["files"] == raw["files"] and shown["components"] == raw["components"]


def test_inspect_pipeline_ranks(capsys, made):
    _, out, _ = cli(capsys, "inspect", made / "pp" / "checkpoint-5")
    model = next(line for line in out.splitlines() if line.startswith("model "))
    assert model.split()[1:3] == ["per_rank", "0,1"]
    assert "model_state_rank_1.safetensors.zst" in out


def test_inspect_errors(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    _damage(run, "manifest")
    code, _, err = cli(capsys, "inspect", run / "checkpoint-30")
    assert code == 1 and "Malformed manifest" in err
    code, _, err = cli(capsys, "inspect", run)
    assert code == 1 and "run directory" in err and "checkpoint-30" in err


# -------------------------------------------------------------------------------------- verify


def test_verify_good(capsys, made):
    code, out, err = cli(capsys, "verify", made / "run" / "checkpoint-30")
    assert code == 0 and err == ""  # no progress bar: stderr is not a terminal
    assert out.startswith(f"OK   {made / 'run' / 'checkpoint-30'}: 3 files")
    code, out, _ = cli(capsys, "verify", made / "run", "--threads", "2")
    assert code == 0 and out.count("OK   ") == 3 and "3 of 3 checkpoints verified" in out


def test_verify_verbose_lists_every_file(capsys, made):
    checkpoint = made / "run" / "checkpoint-30"
    for argv in (["-v", "verify", checkpoint], ["verify", checkpoint, "-v"]):
        code, out, _ = cli(capsys, *argv)
        assert code == 0 and out.count("ok   ") == 3 and f"ok   {checkpoint / 'model.safetensors'}: " in out
    assert "ok   " not in cli(capsys, "verify", checkpoint)[1]


@pytest.mark.parametrize("run, checkpoint", [("zstd", "checkpoint-7"), ("pp", "checkpoint-5"), ("pp_pt", "checkpoint-5")])
def test_verify_other_layouts(capsys, made, run, checkpoint):
    assert cli(capsys, "verify", made / run / checkpoint)[0] == 0


def test_verify_names_each_bad_file(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    flip_byte(run / "checkpoint-30" / "model.safetensors")
    flip_byte(run / "checkpoint-30" / "rng_state.pt")
    code, out, _ = cli(capsys, "verify", run / "checkpoint-30")
    assert code == 1
    assert f"BAD  {run / 'checkpoint-30' / 'model.safetensors'}: xxh3 does not match the manifest" in out
    assert f"BAD  {run / 'checkpoint-30' / 'rng_state.pt'}: xxh3" in out
    assert "2 of 3 files damaged" in out
    code, out, _ = cli(capsys, "verify", run)
    assert code == 1 and out.count("OK   ") == 2 and "damaged: checkpoint-30" in out


def test_verify_sizes_and_manifest(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    _damage(run, "truncated")
    code, out, _ = cli(capsys, "verify", run / "checkpoint-30")
    assert code == 1 and "model.safetensors: size" in out
    (run / "checkpoint-20" / MANIFEST_NAME).write_text("[]")
    code, out, _ = cli(capsys, "verify", run / "checkpoint-20")
    assert code == 1 and out.startswith(f"BAD  {run / 'checkpoint-20'}: Malformed manifest")


def test_verify_missing_files(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    _damage(run, "optional_missing")
    code, out, _ = cli(capsys, "verify", run / "checkpoint-30")
    assert code == 0 and "MISSING" in out and "optimizer_state.pt" in out and "(1 optional missing)" in out
    (run / "checkpoint-30" / "model.safetensors").unlink()
    code, out, _ = cli(capsys, "verify", run / "checkpoint-30")
    assert code == 1 and "model.safetensors: missing, and component 'model' is required" in out


def test_verify_progress_goes_to_a_terminal_only(made, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["verify", str(made / "run" / "checkpoint-10")]) == 0
    assert "3/3 files" in terminal.getvalue()
    assert "3/3" not in capsys.readouterr().out


def test_verify_refuses_what_is_not_a_checkpoint(capsys, tmp_path):
    code, _, err = cli(capsys, "verify", tmp_path)
    assert code == 1 and "no checkpoints under" in err


# --------------------------------------------------------------------------------------- clean


def test_clean_keeps_a_fresh_leftover_unless_forced(capsys, made, tmp_path):
    run = copy(made, "crashed", tmp_path)
    staging = next(run.glob(".checkpoint-40.staging-*"))
    code, out, _ = cli(capsys, "clean", run)
    assert code == 0 and out.startswith(f"kept {staging}") and "--force" in out and staging.exists()
    code, out, _ = cli(capsys, "clean", run, "--force", "--dry-run")
    assert code == 0 and out == f"would remove {staging} (staging leftover)\n" and staging.exists()
    code, out, _ = cli(capsys, "clean", run, "--force")
    assert code == 0 and out == f"removed {staging} (staging leftover)\n" and not staging.exists()
    assert cli(capsys, "clean", run)[1] == "nothing to remove\n"
    assert sorted(p.name for p in run.iterdir() if p.name != "async_ckpt.lock") == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_clean_removes_an_old_leftover(capsys, made, tmp_path):
    run = copy(made, "crashed", tmp_path)
    staging = next(run.glob(".checkpoint-40.staging-*"))
    age(staging, 3600)
    code, out, _ = cli(capsys, "clean", run)
    assert code == 0 and out == f"removed {staging} (staging leftover)\n" and not staging.exists()


def test_clean_keep(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    code, out, _ = cli(capsys, "clean", run, "--keep", "2", "--dry-run")
    assert code == 0 and out == f"would remove {run / 'checkpoint-10'}\n" and (run / "checkpoint-10").exists()
    code, out, _ = cli(capsys, "clean", run, "--keep", "1")
    assert out == f"removed {run / 'checkpoint-10'}\nremoved {run / 'checkpoint-20'}\n"
    assert [p.name for p in run.iterdir() if p.name != "async_ckpt.lock"] == ["checkpoint-30"]
    assert cli(capsys, "clean", run, "--keep", "1")[1] == "nothing to remove\n"
    code, _, err = cli(capsys, "clean", run, "--keep", "0")
    assert code == 1 and "--keep must be at least 1" in err


def test_clean_keep_spares_the_checkpoint_resume_would_pick(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    _damage(run, "truncated")  # newest is damaged: resume picks checkpoint-20
    code, out, _ = cli(capsys, "clean", run, "--keep", "1")
    assert code == 0 and out == f"removed {run / 'checkpoint-10'}\n"
    assert sorted(p.name for p in run.iterdir() if p.name != "async_ckpt.lock") == ["checkpoint-20", "checkpoint-30"]


def test_clean_restores_an_interrupted_resave(capsys, made, tmp_path):
    run = copy(made, "run", tmp_path)
    aside = run / ".checkpoint-30.replaced-0123456789ab"
    os.rename(run / "checkpoint-30", aside)  # a re-save of step 30 died between its two renames
    age(aside, 3600)
    code, out, _ = cli(capsys, "clean", run, "--dry-run")
    assert code == 0 and out.startswith(f"would restore {run / 'checkpoint-30'}") and aside.exists()
    code, out, _ = cli(capsys, "clean", run)
    assert out.startswith(f"restored {run / 'checkpoint-30'}") and (run / "checkpoint-30" / MANIFEST_NAME).exists()


# -------------------------------------------------------------------------------------- export


def _expected_net() -> dict[str, torch.Tensor]:
    return _net().state_dict()


@pytest.mark.parametrize("run", ["pp", "pp_pt"])
def test_export_merges_pipeline_stages(capsys, made, tmp_path, run):
    code, out, _ = cli(capsys, "export", made / run / "checkpoint-5", tmp_path / "hf")
    target = tmp_path / "hf" / "model.safetensors"
    assert code == 0 and out.startswith(f"wrote {target}: 4 tensors") and "from 2 file(s) of step 5" in out
    loaded = safetensors.torch.load_file(target)
    expected = _expected_net()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    model = Net()
    model.load_state_dict(loaded)  # strict: every name of the model, and nothing else
    with safetensors.safe_open(target, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_export_single_file_and_output_path(capsys, made, tmp_path):
    target = tmp_path / "weights.safetensors"
    code, _, _ = cli(capsys, "export", made / "zstd" / "checkpoint-7", target)
    loaded = safetensors.torch.load_file(target)
    assert code == 0 and set(loaded) == set(_expected_net())
    with CheckpointManager(made / "zstd", _components(Net())) as mgr:
        assert mgr.load(strict=False).loaded[0] == "model"
        assert all(torch.equal(loaded[k], v) for k, v in mgr.components[0].stateful.state_dict().items())


def test_export_refuses_clashing_stages(capsys, made, tmp_path):
    code, out, err = cli(capsys, "export", made / "pp_clash" / "checkpoint-5", tmp_path)
    assert code == 1 and out == ""
    assert "'bias' is in both model_state_rank_0.safetensors and model_state_rank_1.safetensors with different values" in err
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_tied_weights(capsys, made, tmp_path, fmt):
    checkpoint = made / f"tied_{fmt}" / "checkpoint-1"
    code, out, _ = cli(capsys, "export", checkpoint, tmp_path)
    assert code == 0 and "1 tied name(s) stored once" in out
    target = tmp_path / "model.safetensors"
    assert list(safetensors.torch.load_file(target)) == ["emb.weight"]
    with safetensors.safe_open(target, "pt") as handle:
        assert handle.metadata() == {"format": "pt", "head.weight": "emb.weight"}
    model = Tied()
    missing, unexpected = safetensors.torch.load_model(model, target)  # how stock safetensors re-ties
    assert not missing and not unexpected and model.head.weight is model.emb.weight
    code, out, _ = cli(capsys, "export", checkpoint, tmp_path / "dup.safetensors", "--duplicate-tied")
    duplicated = safetensors.torch.load_file(tmp_path / "dup.safetensors")
    assert code == 0 and "duplicated" in out and sorted(duplicated) == ["emb.weight", "head.weight"]
    assert torch.equal(duplicated["emb.weight"], duplicated["head.weight"])
    Tied().load_state_dict(duplicated)


def test_export_checks_hashes(capsys, made, tmp_path):
    run = copy(made, "pp", tmp_path)
    flip_byte(run / "checkpoint-5" / "model_state_rank_1.safetensors.zst")
    code, _, err = cli(capsys, "export", run / "checkpoint-5", tmp_path / "out")
    assert code == 1 and "Hash mismatch" in err and "model_state_rank_1" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_errors(capsys, made, tmp_path):
    checkpoint = made / "run" / "checkpoint-10"
    code, _, err = cli(capsys, "export", checkpoint, tmp_path, "--component", "ema")
    assert code == 1 and "no component 'ema'" in err and "model" in err
    assert cli(capsys, "export", checkpoint, tmp_path)[0] == 0
    code, _, err = cli(capsys, "export", checkpoint, tmp_path)
    assert code == 1 and "--force" in err
    assert cli(capsys, "export", checkpoint, tmp_path, "--force")[0] == 0
    run = copy(made, "run", tmp_path / "copy")
    (run / "checkpoint-10" / "model.safetensors").unlink()
    code, _, err = cli(capsys, "export", run / "checkpoint-10", tmp_path / "x")
    assert code == 1 and "missing" in err


# --------------------------------------------------------------------------------------- bench


def test_bench_lists_the_benchmarks(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = cli(capsys, "bench")
    names = {line.split()[0] for line in out.splitlines()[2:]}
    assert code == 0 and "stall" in names and "common" not in names
    assert set(find_benchmarks(ROOT / "perf")) == names


def test_bench_runs_a_discovered_module_with_its_arguments(capsys, tmp_path):
    perf = tmp_path / "perfx"
    perf.mkdir()
    (perf / "__init__.py").write_text("")
    (perf / "helpers.py").write_text('"""Not a benchmark."""\n')
    (perf / "hello.py").write_text(
        '"""Says hello."""\nimport argparse, sys\n'
        "def main(argv=None):\n    p = argparse.ArgumentParser()\n    p.add_argument('--name')\n"
        "    print('hello', p.parse_args(argv).name)\n"
        "if __name__ == '__main__':\n    main()\n"
    )
    code, out, _ = cli(capsys, "bench", "--perf-dir", perf)
    assert code == 0 and "hello  Says hello." in out and "helpers" not in out
    assert cli(capsys, "bench", "--perf-dir", perf, "hello", "--name", "you") == (0, "hello you\n", "")
    code, _, err = cli(capsys, "bench", "--perf-dir", perf, "hello", "--bogus")
    assert code == 2 and "unrecognized arguments" in err
    code, _, err = cli(capsys, "bench", "--perf-dir", perf, "nope")
    assert code == 1 and "available: hello" in err
    code, _, err = cli(capsys, "bench", "--perf-dir", tmp_path / "none")
    assert code == 1 and "perf/ of a source checkout" in err


def test_bench_hands_its_arguments_to_the_real_stall_module(capsys, monkeypatch):
    """``--help`` reaches perf/stall.py's own parser (running it takes a minute: the fake module above runs)."""
    monkeypatch.chdir(ROOT)
    code, out, _ = cli(capsys, "bench", "stall", "--help")
    assert code == 0 and out.startswith("usage: async-ckpt bench stall") and "--sizes" in out
