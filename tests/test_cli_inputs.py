"""`tfshard predict --input FILE`: token ids are checked before any cast (in one process).

A plain `astype("int32")` turned float ids into other ids and wrapped int64 ids of
2**31 and more into small ones, and the run then printed MATCH: wrong answers with
exit code 0. Each bad file must now be a ValueError naming the file, its shape and
dtype, and what works."""

import numpy as np
import pytest

from tfshard.cli import files as cli_files


def _inputs(path, vocab=100):
    return cli_files.inputs(["token_ids", "padding_mask"], vocab, 2, 3, 0, str(path))


@pytest.mark.parametrize("ids, words", [
    (np.array([[1.9, 2.7, 3.0]]), ["token ids must be integers", "float64", "(1, 3)", ".npz"]),
    (np.array([[1, 2**31 + 5, 3]], np.int64), ["[0, 100)", "2147483653", "int64"]),
    (np.array([[1, 100, 3]], np.int32), ["[0, 100)", "the vocabulary size", "1..100"]),
    (np.array([[-1, 2, 3]], np.int32), ["[0, 100)", "-1..3"]),
    (np.array([["1", "2"]]), ["token ids must be integers", "<U1"]),
    (np.array([[True, False]]), ["token ids must be integers", "bool"]),
])
def test_bad_token_id_files_are_named_errors(tmp_path, ids, words):
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    with pytest.raises(ValueError) as err:
        _inputs(path)
    message = str(err.value)
    assert f"--input {path}" in message
    for word in words:
        assert word in message, message


def test_ids_beyond_int32_are_caught_without_a_vocabulary(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[0, 2**31]], np.int64))
    with pytest.raises(ValueError, match=r"\[0, 2147483648\)"):
        _inputs(path, vocab=None)


def test_valid_int64_ids_are_kept_exactly(tmp_path):
    path = tmp_path / "ids.npy"
    ids = np.array([[0, 5, 99], [7, 8, 9]], np.int64)
    np.save(path, ids)
    x = _inputs(path)
    assert x["token_ids"].dtype == np.int32 and np.array_equal(x["token_ids"], ids)
    assert np.array_equal(x["padding_mask"], np.ones_like(ids))


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"--input .*nothing\.npy: no such file"):
        _inputs(tmp_path / "nothing.npy")
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"--input .*bad\.npy: not a readable \.npy/\.npz"):
        _inputs(bad)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects\.npy: not a readable"):
        _inputs(objects)


# --output: checked on rank 0 before any work (it failed only after the whole run, left
# PATH.tmp-PID.npy beside a folder, and the other ranks exited 0).


def test_output_problems_are_named_before_the_run(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    assert "is a folder" in cli_files.output_problem(str(folder))
    assert "does not exist" in cli_files.output_problem(str(tmp_path / "no" / "x.npy"))
    assert "cannot write there" in cli_files.output_problem("/proc/tfshard-out.npy")
    assert cli_files.output_problem(str(tmp_path / "x.npy")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the write probe left a file"


def test_failed_output_write_leaves_nothing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    problem = cli_files.save_atomic(str(folder), np.zeros(3))
    assert "writing failed" in problem and "nothing was written" in problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert cli_files.save_atomic(str(tmp_path / "ok.npy"), np.arange(3)) is None
    assert np.array_equal(np.load(tmp_path / "ok.npy"), np.arange(3))


@pytest.mark.parametrize("argv, words", [
    (["predict", "gpt2-tiny", "--output", "/proc/tfshard-out.npy"],
     ["--output /proc/tfshard-out.npy: cannot write there", "seen by rank 0"]),
    (["generate", "gpt2-tiny", "--prompt", "hi"],
     ["'gpt2-tiny' is a built-in test model", "no tokenizer", "smollm2"]),
])
def test_cli_refuses_before_loading_anything(argv, words):
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "tfshard", *argv], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    for word in words:
        assert word in res.stderr, res.stderr[-2000:]
    assert "[tfshard] global output" not in res.stdout, "it ran the model first"
    assert time.perf_counter() - t0 < 120


def test_cli_dtype_choices_are_the_float_policies():
    """The parser spells out `--dtype`'s choices (building it imports no TensorFlow)."""
    from tfshard import cli
    from tfshard.io import FLOAT_POLICIES

    assert cli.FLOAT_POLICIES == FLOAT_POLICIES


@pytest.mark.parametrize("argv, code, stream, words", [
    (["--help"], 0, "stdout", ["predict", "generate", "inspect", "launch", "bench"]),
    (["predict", "--help"], 0, "stdout", ["--tensor-parallel", "--no-compare"]),
    (["predict"], 2, "stderr", ["the following arguments are required: source"]),
    (["predict", "gpt2-tiny", "--rows", "x"], 2, "stderr", ["invalid int value: 'x'"]),
])
def test_cli_help_and_argument_errors_import_no_tensorflow(argv, code, stream, words):
    """`tfshard --help` and argument errors are instant and clean: no TensorFlow import, so
    none of its start-up log lines before the usage."""
    import subprocess
    import sys

    script = ("import sys, runpy; sys.argv = ['tfshard'] + sys.argv[1:]\n"
              "try:\n    runpy.run_module('tfshard', run_name='__main__')\n"
              "except SystemExit as e:\n"
              "    assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
              "'imported TensorFlow'\n    raise")
    res = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == code, res.stdout[-2000:] + res.stderr[-2000:]
    for word in words:
        assert word in getattr(res, stream), getattr(res, stream)[-2000:]
    assert "imported TensorFlow" not in res.stderr and "absl" not in res.stderr, res.stderr


def test_commands_import_tensorflow_with_the_collector_paused_then_frozen():
    """`tfshard COMMAND` imports TensorFlow and Keras with no collection while they load,
    then freezes them; the collector is on again afterwards, and a process that had
    turned it off itself keeps it off."""
    import subprocess
    import sys

    script = """if True:
        import gc, sys
        from tfshard import cli
        passes = []
        gc.callbacks.append(lambda phase, info: passes.append(phase))
        cli.import_tensorflow()
        print("keras" in sys.modules and "tensorflow" in sys.modules, len(passes),
              gc.isenabled(), gc.get_freeze_count() > 100000)
        gc.disable()
        cli.import_tensorflow()
        print(gc.isenabled())
    """
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "0", "True", "True", "False"], out.stdout
