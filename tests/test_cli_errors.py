"""Bad input and rough edges of the command-line tools: one `error:` line and exit 2, checked before any work;
exit 130 on Ctrl-C; --version and an exit-code table on every CLI (the layering is tests/test_architecture.py's).

Exit codes are checked through the real CLI in a subprocess; argparse bounds and help texts in process (argparse
exits through SystemExit with the code the process would return).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress import create_dynamicvit
from compress.data.images import ImageSourceError, check_image_source
from compress.models.checkpoint import save_dynamicvit
from compress.plumbing.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, keep_ratio_argument, positive_int
from compress.plumbing.errors import PipelineError
from conftest import run_in_process

REPO = Path(__file__).resolve().parents[1]
VERSION = importlib.metadata.version("vit-prune-deploy")
OWN_CLIS = ("compress.describe", "compress.visualize", "export.sweep", "export.bench_pruning")
TRAINING_CLIS = ("compress.train", "compress.masked_ft", "compress.tocom_train", "compress.demo")
TINY_32PX = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10,
                 pruning_locations=(1, 3, 5))


def sigint_as_a_terminal_sends_it():
    """For a child process: SIGINT's default action, which Python turns into KeyboardInterrupt. A child inherits an
    ignored SIGINT from a parent run in the background (a CI job, ``cmd &``), and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args: str | os.PathLike, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the error naming every fragment."""
    assert result.returncode == EXIT_USER_ERROR, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    line = [text for text in result.stderr.splitlines() if text.strip()][-1]
    assert "error: " in line, result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(scope="module")
def model_32px(tmp_path_factory) -> Path:
    """A 32-pixel DynamicViT checkpoint (not the demo's 64): tools must use the model's own input size."""
    torch.manual_seed(0)
    model = create_dynamicvit("vit_small_patch16_224", keep_ratio=0.7, **TINY_32PX)
    path = tmp_path_factory.mktemp("model") / "model_32px.pth"
    save_dynamicvit(model, path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of three 48x40 random RGB images (any size: the folder is resized to the model's input)."""
    root = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(generator.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- compress.describe


def test_describe_names_what_is_supported_for_a_non_vit_architecture():
    line = assert_user_error(run("compress.describe", "-m", "resnet50"), "resnet50", "Supported")
    assert "dynamicvit_deit_small" in line  # the registered variants are listed


def test_describe_refuses_keep_zero_instead_of_describing_keep_07():
    result = run_in_process("compress.describe", "--keep", "0")
    assert_user_error(result, "--keep", "(0, 1]")
    assert "keep ratio   0.7" not in result.stdout


def test_standard_library_inspect_is_not_shadowed():
    import inspect

    assert hasattr(inspect, "signature") and not (REPO / "compress" / "inspect.py").exists()


# ----------------------------------------------------------------------------- compress.visualize


def test_visualize_draws_a_32px_model_from_an_image_folder(tmp_path, model_32px, image_folder):
    out = tmp_path / "pictures" / "kept.png"
    result = run("compress.visualize", "-c", model_32px, "--data", image_folder, "-n", "4", "--first", "1",
                 "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["kept.png"]  # no temporary file left


def test_visualize_default_output_is_not_a_tracked_docs_file():
    from compress.visualize import build_parser

    default = build_parser().parse_args([]).out
    assert default.parts[0] == "runs" and "/runs/" in (REPO / ".gitignore").read_text().split()


def test_visualize_refuses_bad_input_in_one_line(tmp_path, model_32px):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_in_process("compress.visualize", "-c", model_32px, "--data", tmp_path / "empty", "--out",
                                     tmp_path / "x.png"), "holds no images")
    assert_user_error(run_in_process("compress.visualize", "--first", "100000", "--out", tmp_path / "x.png"),
                      "no image selected")
    assert_user_error(run_in_process("compress.visualize", "--images", "0", "--out", tmp_path / "x.png"),
                      "integer >= 1")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(run_in_process("compress.visualize", "--out", blocker / "x.png"), "not writable")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- image sources


def test_check_image_source_refuses_unusable_sources_in_one_line(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    np.save(tmp_path / "three_d.npy", np.zeros((3, 8, 8), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((2, 3, 8, 8), np.int32))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {"empty": "holds no images", "broken": "cannot read image", "three_d.npy": "expected images [N, C, H, W]",
             "ints.npy": "must be float", "junk.npz": "cannot read image array", "notes.txt": "neither a folder",
             "absent": "not found"}
    for name, message in cases.items():
        with pytest.raises(ImageSourceError, match=re.escape(message)) as caught:
            check_image_source(str(tmp_path / name))
        assert isinstance(caught.value, PipelineError) and "\n" not in str(caught.value)
    np.savez(tmp_path / "good.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    for usable in ("demo", str(image_folder), str(tmp_path / "good.npz")):
        assert check_image_source(usable) is None


# ----------------------------------------------------------------------------- export.sweep


def test_sweep_refuses_an_unwritable_output_before_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("export.sweep", "--keeps", "0.7", "-n", "2", "--out", blocker / "sweeps")
    assert_user_error(result, "not writable")
    assert "[1/1] keep 0.7" not in result.stderr  # nothing was measured


@pytest.mark.parametrize("flags, message", [
    (["-n", "0"], "integer >= 1"),
    (["-b", "0"], "integer >= 1"),
    (["--warmup", "-1"], "integer >= 0"),
    (["--keeps", "0"], "(0, 1]"),
    (["--keeps", "1.5"], "(0, 1]"),
    (["--latency-budget", "-1"], "number > 0"),
    (["--latency-budget", "nan"], "number > 0"),
    (["--min-accuracy", "80"], "[0, 1]"),
    (["--tocom-scale", "inf"], "number > 0"),
    (["--tocom-scale", "0"], "number > 0"),
])
def test_sweep_numeric_flags_are_bounded_when_parsed(flags, message):
    from export.sweep import build_parser

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as caught:
        build_parser().parse_args(flags)
    assert caught.value.code == EXIT_USER_ERROR and message in stderr.getvalue()


def test_bounded_argument_types():
    assert keep_ratio_argument("1") == 1.0 and keep_ratio_argument("0.05") == 0.05 and positive_int("3") == 3
    for parse, text in ((keep_ratio_argument, "0"), (keep_ratio_argument, "-inf"), (positive_int, "1.5"),
                        (positive_int, "0")):
        with pytest.raises(Exception, match="expected"):
            parse(text)


# ----------------------------------------------------------------------------- every CLI: --version, exit codes


@pytest.mark.parametrize("module", OWN_CLIS + TRAINING_CLIS)
def test_every_cli_has_version_and_documents_its_exit_codes(module):
    if module == "compress.masked_ft":  # its options are compress.train's, built in masked mode
        parser = importlib.import_module("compress.train").build_parser(masked=True)
    else:
        parser = importlib.import_module(module).build_parser()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as caught:
        parser.parse_args(["--version"])
    assert caught.value.code == 0 and stdout.getvalue().strip().endswith(VERSION)
    help_text = parser.format_help()
    assert "exit codes:" in help_text and "  2 " in help_text and "  130 " in help_text


def test_training_ends_by_printing_where_its_checkpoint_went(tmp_path):
    result = run("compress.train", "--limit-train", "16", "--limit-eval", "8", "--epochs", "1", "--batch-size", "8",
                 "--warmup-epochs", "0", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"checkpoint written to {tmp_path / 'run' / 'model.pth'}"
    assert (tmp_path / "run" / "model.pth").is_file()


# ----------------------------------------------------------------------------- Ctrl-C

# A process that runs a TokenGather session (the Python custom op) in a loop under run_cli, as validation does.
PLUGIN_LOOP = """
import sys
import numpy as np
from compress.plumbing.cli import run_cli
from trt_plugins.ort_token_gather import make_session, make_token_gather_model

def main(argv):
    session = make_session(make_token_gather_model(k=96, with_indices=True))
    rng = np.random.default_rng(0)
    feed = {"tokens": rng.standard_normal((64, 197, 192)).astype(np.float32),
            "scores": rng.standard_normal((64, 196)).astype(np.float32)}
    print("running", flush=True)
    while True:
        session.run(None, feed)

sys.exit(run_cli(main))
"""


def test_sigint_held_defers_ctrl_c_to_the_end_of_the_block():
    from trt_plugins.ort_token_gather import sigint_held

    reached_end = False
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever runs pytest
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here: it must only record the signal
                reached_end = True
        assert reached_end and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("delay", [0.3, 1.2])
def test_ctrl_c_during_plugin_session_runs_exits_130_cleanly(delay):
    pytest.importorskip("onnxruntime_extensions")
    process = subprocess.Popen([sys.executable, "-c", PLUGIN_LOOP], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_a_terminal_sends_it)
    assert process.stdout.readline().strip() == "running"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "terminate called" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_ctrl_c_during_plugin_validation_exits_130_and_leaves_nothing(tmp_path, delay):
    """The export interrupted ``delay`` seconds into its plugin-flavour step (TokenGather on ONNX Runtime)."""
    pytest.importorskip("onnxruntime_extensions")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "export.build", "--gather", "plugin", "--keep", "0.6",
                                "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=sigint_as_a_terminal_sends_it)
    seen = []
    for line in process.stderr:  # progress lines: "[3  12.6s] exporting and validating the plugin-flavour ..."
        seen.append(line)
        if line.startswith("[") and "plugin" in line:
            break
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)
    stderr = "".join(seen) + rest
    if process.returncode == 0:
        pytest.skip(f"the export finished within {delay} s of its plugin step on this machine: nothing to interrupt")
    assert process.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "terminate called" not in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no half-written --out
