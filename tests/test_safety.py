"""Never a silently wrong result: stale or colliding outputs, ignored settings, concurrent
writers, interrupted merges and OS errors each end in a correct file or a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import CLI_ENV, h5_datasets, interrupt_cli, sigterm_cli, texture, texture_folder

from dift_sfm.cli import main
from dift_sfm.confs import ConfError, get_conf, resolve_conf
from dift_sfm.errors import DiftSfmError, FormatError
from dift_sfm.extract import extract_features
from dift_sfm.formats.features import FeaturesReader, list_names
from dift_sfm.formats.h5store import OutputLockedError, ShardedH5Writer
from dift_sfm.formats.matches import is_complete_matches, read_matches
from dift_sfm.formats.resume import StaleOutputError, may_resume, settings_diff
from dift_sfm.match import conf_for_matching, match_features
from dift_sfm.pairs import exhaustive_pairs, write_pairs

ENV = CLI_ENV


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``dift-sfm`` in a fresh process (real exit codes, signals and stderr)."""
    return subprocess.run([sys.executable, "-m", "dift_sfm.cli", *args], env=ENV,
                          capture_output=True, text=True, **kwargs)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), texture(200, 260, seed=i))
    return folder


# ----------------------------------------------------------------------- 1. stale matches
def test_matches_of_other_features_are_refused_then_overwritten(images, tmp_path):
    a = extract_features(get_conf("sift"), images, tmp_path / "A.h5")
    b = extract_features(get_conf("sift", {"keypoints.max_keypoints": 50}), images,
                         tmp_path / "B.h5")
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(list_names(a)))
    m = tmp_path / "m.h5"
    assert main(["match", str(pairs), "--features", str(a), "-o", str(m)]) == 0
    with pytest.raises(StaleOutputError, match="computed from other features"):
        match_features(conf_for_matching(b), pairs, b, m)
    assert main(["match", str(pairs), "--features", str(b), "-o", str(m)]) == 1
    assert main(["match", str(pairs), "--features", str(b), "-o", str(m), "--overwrite"]) == 0
    with FeaturesReader(b) as f:
        for n0, n1 in exhaustive_pairs(f.names):
            idx, _ = read_matches(m, n0, n1)
            assert idx[:, 1].max() < len(f.keypoints(n1)) <= 50
    # matching B again resumes everything: nothing to do, same file
    before = h5_datasets(m)
    assert main(["match", str(pairs), "--features", str(b), "-o", str(m)]) == 0
    after = h5_datasets(m)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_matches_with_other_matcher_settings_are_refused(images, tmp_path):
    feats = extract_features(get_conf("sift"), images, tmp_path / "f.h5")
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(list_names(feats)))
    m = tmp_path / "m.h5"
    assert main(["match", str(pairs), "--features", str(feats), "-o", str(m)]) == 0
    with pytest.raises(StaleOutputError, match="ratio_threshold"):
        match_features(conf_for_matching(feats, None, {"matcher.ratio_threshold": 0.9}),
                       pairs, feats, m)
    # runtime settings (where it runs) never block a resume
    match_features(conf_for_matching(feats, None, {"matcher.device": "cpu"}), pairs, feats, m)


def test_the_resume_rule():
    old = {"featurizer": {"name": "sd", "t": 0, "batch_size": 1, "device": "cuda"}}
    assert settings_diff(old, {"featurizer": {"name": "sd", "t": 0, "batch_size": 4}}) == []
    assert settings_diff(old, {"featurizer": {"name": "sd", "t": 41}}) == [
        "featurizer.t: 0 -> 41"]
    assert settings_diff(old, {"featurizer": {"name": "adm", "t": 41}}) == [
        "featurizer.name: \"sd\" -> \"adm\""]
    here = Path(__file__)
    assert may_resume(here.with_name("absent.h5"), old, old, overwrite=False) is False
    assert may_resume(here, None, old, overwrite=False) is True  # records nothing (hloc)
    assert may_resume(here, old, old, overwrite=True) is True
    assert may_resume(here, old, {"featurizer": {"t": 41}}, overwrite=True) is False
    with pytest.raises(StaleOutputError, match="written by conf 'x'.*--overwrite"):
        may_resume(here, old, {"featurizer": {"t": 41}}, overwrite=False, written_by="x")


def test_shards_of_another_conf_are_not_merged(images, tmp_path):
    """An interrupted run of conf A leaves shards; a run of conf B must not adopt them."""
    out = tmp_path / "f.h5"
    conf_a = get_conf("sift", {"keypoints.max_keypoints": 30})
    w = ShardedH5Writer(out, lambda g: "keypoints" in g,
                        {"conf_json": json.dumps({k: conf_a[k] for k in conf_a if k != "name"})})
    w.write("0.png", {"keypoints": np.zeros((3, 2), np.float32)})
    w.close()  # killed before the merge: only a shard exists
    with pytest.raises(StaleOutputError, match="max_keypoints"):
        extract_features(get_conf("sift"), images, out)
    extract_features(get_conf("sift"), images, out, overwrite=True)
    with FeaturesReader(out) as f:
        assert len(f.keypoints("0.png")) > 30


# ----------------------------------------------------------------------- 2. key collisions
def test_names_with_the_same_pair_key_are_refused_before_work(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("sub/x.png", "sub-x.png", "y.png"):
        cv2.imwrite(str(folder / name), texture(64, 64))
    out = tmp_path / "f.h5"
    for args in (["extract", str(folder), "-o", str(out)],
                 ["pairs", "exhaustive", str(folder), "-o", str(tmp_path / "p.txt")]):
        result = cli(*args)
        assert result.returncode == 1
        assert "'sub-x.png' and 'sub/x.png'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "p.txt").exists()
    # match: a features file that holds both (written by another tool)
    w = ShardedH5Writer(out, lambda g: True)
    for name in ("sub/x.png", "sub-x.png", "y.png"):
        w.write(name, {"keypoints": np.zeros((2, 2), np.float32),
                       "descriptors": np.ones((4, 2), np.float32),
                       "scores": np.ones(2, np.float32), "image_size": np.array([64, 64])})
    w.finalize()
    (tmp_path / "p.txt").write_text("sub/x.png y.png\nsub-x.png y.png\nsub/x.png sub-x.png\n")
    result = cli("match", str(tmp_path / "p.txt"), "--features", str(out), "-o",
                 str(tmp_path / "m.h5"))
    assert result.returncode == 1 and "one hloc matches.h5 key" in result.stderr
    assert not (tmp_path / "m.h5").exists()


# ----------------------------------------------------------------------- 3. ignored settings
@pytest.mark.parametrize("override,message", [
    ("keypoints.max_keypoint=100", "Unknown keypoints option 'keypoints.max_keypoint'. "
                                   "Did you mean 'max_keypoints'?"),
    ("featurizer.nosuch=3", "Unknown featurizer option 'featurizer.nosuch'"),
    ("matcher.ratio=0.8", "Did you mean 'ratio_threshold'"),
    ("keypoint.max_keypoints=3", "Unknown conf section 'keypoint.max_keypoints'"),
    ("keypoints.max_keypoints=abc", "should be of type int"),
    ("keypoints.contrast_threshold=yes", "should be of type float"),
    ("keypoints.multi_orientation=2", "should be of type bool"),
])
def test_unknown_keys_and_wrong_types_are_one_line_errors(override, message, images, tmp_path):
    result = cli("extract", str(images), "-o", str(tmp_path / "f.h5"), "--set", override)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.h5").exists()
    key, value = override.split("=")
    with pytest.raises(ConfError):
        get_conf("sift", {key: value})


# ----------------------------------------------------------------------- 4. mismatched conf
def test_match_uses_the_stored_conf_and_refuses_another_featurizer(images, tmp_path):
    feats = extract_features(get_conf("sift", {"matcher.ratio_threshold": 0.6}), images,
                             tmp_path / "f.h5")
    conf = conf_for_matching(feats)
    assert conf["matcher"]["ratio_threshold"] == 0.6  # the stored override, not the default
    assert conf_for_matching(feats, None, {"matcher.ratio_threshold": 0.7})[
        "matcher"]["ratio_threshold"] == 0.7
    with pytest.raises(FormatError, match="--conf dift-adm does not fit.*featurizer.name"):
        conf_for_matching(feats, "dift-adm")
    with pytest.raises(FormatError, match="only takes matcher settings"):
        conf_for_matching(feats, None, {"keypoints.max_keypoints": 3})
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(list_names(feats)))
    result = cli("match", str(pairs), "--features", str(feats), "-o", str(tmp_path / "x.h5"),
                 "--conf", "dift-adm")
    assert result.returncode == 1 and "does not fit" in result.stderr
    # the same features settings: allowed, and then the named conf's matcher applies
    assert conf_for_matching(feats, "sift")["matcher"]["ratio_threshold"] == 0.8


def test_match_applies_the_matcher_override_stored_by_extract(images, tmp_path):
    """Issue 13: extract --set matcher.X is honoured by a later `match` without --conf."""
    pairs = tmp_path / "pairs.txt"
    counts = {}
    for ratio in (None, 0.6):
        args = ["extract", str(images), "-o", str(tmp_path / f"f{ratio}.h5")]
        args += [] if ratio is None else ["--set", f"matcher.ratio_threshold={ratio}"]
        assert main(args) == 0
        write_pairs(pairs, exhaustive_pairs(list_names(tmp_path / f"f{ratio}.h5")))
        m = tmp_path / f"m{ratio}.h5"
        assert main(["match", str(pairs), "--features", str(tmp_path / f"f{ratio}.h5"),
                     "-o", str(m)]) == 0
        counts[ratio] = sum(len(read_matches(m, *p)[0]) for p in exhaustive_pairs(
            list_names(tmp_path / f"f{ratio}.h5")))
        with h5py.File(m) as f:
            stored = json.loads(f.attrs["matcher_json"])
        assert stored["ratio_threshold"] == (0.8 if ratio is None else ratio)
    assert counts[0.6] < counts[None]


# ----------------------------------------------------------------------- 5. empty pairs
def test_empty_pairs_file_is_an_error(images, tmp_path):
    feats = extract_features(get_conf("sift"), images, tmp_path / "f.h5", image_list=["0.png"])
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    result = cli("match", str(tmp_path / "empty.txt"), "--features", str(feats), "-o",
                 str(tmp_path / "m.h5"))
    assert result.returncode == 1 and "holds no pairs" in result.stderr
    assert not (tmp_path / "m.h5").exists()


# ----------------------------------------------------------------------- robustness
def test_a_second_writer_of_the_same_output_is_refused_at_once(tmp_path):
    out = tmp_path / "m.h5"
    first = ShardedH5Writer(out, is_complete_matches)
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError, match="Another dift-sfm process is writing"):
        ShardedH5Writer(out, is_complete_matches)
    assert time.monotonic() - t0 < 5
    first.finalize()
    ShardedH5Writer(out, is_complete_matches).close()  # released: the next writer gets it


def test_concurrent_extract_processes(images, tmp_path):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from dift_sfm.formats.h5store import ShardedH5Writer;"
         f"w = ShardedH5Writer({str(out)!r}, lambda g: True); print('locked', flush=True);"
         "time.sleep(60)"], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("extract", str(images), "-o", str(out))
        assert result.returncode == 1 and "Another dift-sfm process is writing" in result.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9 releases the lock with the process
        holder.wait()
    assert cli("extract", str(images), "-o", str(out)).returncode == 0
    assert list_names(out) == ["0.png", "1.png", "2.png", "3.png"]


def test_kill_9_between_shards_and_merge_keeps_root_attributes(images, tmp_path):
    reference = extract_features(get_conf("sift"), images, tmp_path / "ref.h5")
    out = tmp_path / "f.h5"
    killer = ("import os, signal, sys; from dift_sfm.formats import h5store; "
              "h5store.ShardedH5Writer.finalize = "
              "lambda self, **kw: (self._close_shard(), os.kill(os.getpid(), signal.SIGKILL)); "
              "from dift_sfm.cli import main; "
              f"sys.exit(main(['extract', {str(images)!r}, '-o', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", killer], env=ENV, capture_output=True)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert cli("extract", str(images), "-o", str(out)).returncode == 0  # nothing left to do
    with h5py.File(reference) as a, h5py.File(out) as b:
        assert dict(a.attrs) == dict(b.attrs) and b.attrs["featurizer_dim"] == 128
    ref, got = h5_datasets(reference), h5_datasets(out)
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)


def test_unwritable_output_folder_fails_before_any_work(images, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    immutable = False
    if os.access(locked, os.W_OK):  # root ignores permissions: make the folder immutable
        immutable = subprocess.run(["chattr", "+i", str(locked)],
                                   capture_output=True).returncode == 0
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        result = cli("extract", str(images), "-o", str(locked / "f.h5"))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)
    assert result.returncode == 1 and "not writable" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "Extracting" not in result.stderr  # refused before the first image
    assert not list(locked.iterdir())


def test_disk_full_is_one_line_and_keeps_finished_work(tmp_path):
    folder = texture_folder(tmp_path / "images", 40, 160, 200)
    out = tmp_path / "f.h5"
    limit = 3 * 2**20  # shards (16 images) fit, the merged file does not: EFBIG, errno 27

    def small_disk() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "dift_sfm.cli", "extract", str(folder),
                             "-o", str(out), "--set", "keypoints.max_keypoints=200"],
                            env=ENV, capture_output=True, text=True, preexec_fn=small_disk)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR]" in line]
    assert len(errors) == 1 and f"Could not write {out}" in errors[0], result.stderr
    assert "errno 27" in errors[0] and not out.exists()
    # finished shards survive: the rerun (with room) continues from them
    rerun = cli("extract", str(folder), "-o", str(out), "--set", "keypoints.max_keypoints=200")
    assert rerun.returncode == 0, rerun.stderr
    done = [line for line in rerun.stderr.splitlines() if "already done" in line]
    assert done and " (0 already done)" not in done[0], rerun.stderr
    assert len(list_names(out)) == 40


def test_sigterm_ends_with_one_line_and_no_native_stack(images, tmp_path):
    many = texture_folder(tmp_path / "many", 60, 200, 260)
    proc = interrupt_cli(["extract", str(many), "-o", str(tmp_path / "f.h5")],
                         tmp_path / "f.h5.parts", "*", sig=signal.SIGTERM,
                         stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted; completed work is kept" in err
    assert "Traceback" not in err and "*** SIGTERM" not in err and "Check failure" not in err
    probe = subprocess.run([sys.executable, "-c",
                            "import sys; from dift_sfm.cli import build_parser; build_parser();"
                            "import dift_sfm.extract, dift_sfm.match;"
                            "print('pycolmap' in sys.modules)"],
                           env=ENV, capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr


def test_verbosity_flags_after_the_subcommand(images, tmp_path):
    result = cli("extract", str(images), "-o", str(tmp_path / "f.h5"), "-q")
    assert result.returncode == 0 and "Extracting" not in result.stderr


def test_help_texts_and_conf_summaries():
    out = subprocess.run([sys.executable, "-m", "dift_sfm.cli", "match", "--help"], env=ENV,
                         capture_output=True, text=True).stdout
    assert "default: None" not in out and "--features FEATURES" in out and "stored" in out
    listing = cli("confs").stdout.splitlines()
    summaries = {line.split()[0]: line.split(None, 1)[1] for line in listing}
    assert len({summaries[n] for n in ("dift-sd", "dift-sd-semantic", "cleandift-sd")}) == 3
    assert "ratio=0.8" in summaries["sift"]
    with pytest.raises(DiftSfmError):
        get_conf("dift-sd", {"featurizer": 3})


def test_colmap_import_refuses_matches_of_other_features(images, tmp_path):
    """The stale-matches repro, one step later: the database must never get them."""
    from dift_sfm.colmap.database import create_database, import_into_database

    a = extract_features(get_conf("sift"), images, tmp_path / "A.h5")
    b = extract_features(get_conf("sift", {"keypoints.max_keypoints": 4000}), images,
                         tmp_path / "B.h5")  # same counts where < 4000: only provenance tells
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(list_names(a)))
    m = match_features(conf_for_matching(a), pairs, a, tmp_path / "m.h5")
    db = tmp_path / "database.db"
    create_database(db, images, list_names(a))
    with pytest.raises(FormatError, match="computed from other features"):
        import_into_database(db, b, m, pairs)
    stats = import_into_database(db, a, m, pairs)
    assert stats.num_pairs == len(exhaustive_pairs(list_names(a)))


def test_the_cli_starts_without_torch_or_pycolmap():
    """Building the parser and running `pairs` load neither (start-up of every command)."""
    probe = subprocess.run([sys.executable, "-c",
                            "import sys; from dift_sfm.cli import build_parser; build_parser();"
                            "print(sorted({'torch', 'pycolmap', 'diffusers', 'ray'} & "
                            "set(sys.modules)))"],
                           env=ENV, capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stderr


# ----------------------------------------------------------------------- round two (issue 18)
def _one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 1 and exactly one ERROR line, holding every needle, and no traceback."""
    errors = [line for line in result.stderr.splitlines() if " ERROR]" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_sigterm_under_pycolmap_is_ctrl_c_and_keeps_work(tmp_path):
    """`reconstruct` has pycolmap (glog's failure handler) loaded before its first image."""
    many = texture_folder(tmp_path / "many", 40, 200, 260)
    out = tmp_path / "out"
    sigterm_cli(["reconstruct", str(many), "-o", str(out)], out / "feats-sift.h5.parts",
                delay=0.5)
    rerun = cli("extract", str(many), "-o", str(out / "feats-sift.h5"))
    assert rerun.returncode == 0, rerun.stderr
    done = [line for line in rerun.stderr.splitlines() if "already done" in line]
    assert done and " (0 already done)" not in done[0], rerun.stderr
    assert len(list_names(out / "feats-sift.h5")) == 40


def _interrupt_probe(setup: str, trigger: str) -> subprocess.CompletedProcess:
    """A fresh interpreter installs our handler, runs ``setup``, then ``trigger`` and waits up
    to 60 s at safe points; it exits 130 once the interrupt raised where it propagates."""
    script = ("import os, signal, sys, threading, time, weakref\n"
              "from dift_sfm import interrupts\n"
              "interrupts.install()\n"
              f"{setup}"
              "try:\n"
              f"    {trigger}\n"
              "    for _ in range(6000): time.sleep(0.01)\n"
              "except KeyboardInterrupt:\n"
              "    sys.exit(130)\n")
    return subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=120)


def test_handler_put_back_after_pycolmap_import_in_any_thread():
    result = _interrupt_probe(
        "t = threading.Thread(target=lambda: __import__('pycolmap')); t.start(); t.join()\n",
        "os.kill(os.getpid(), signal.SIGTERM)")
    assert result.returncode == 130 and "*** SIGTERM" not in result.stderr, result.stderr


def test_sigterm_raised_inside_a_weakref_callback_is_not_lost(images, tmp_path):
    """The handler runs inside a weakref callback, where Python swallows exceptions
    ("Exception ignored in ..."): the interrupt is delivered again and the command stops."""
    out = tmp_path / "pairs.txt"
    script = ("import signal, sys, time, weakref\n"
              "import dift_sfm.pairs as P\n"
              "real = P.write_pairs\n"
              "class Box: pass\n"
              "def write_pairs(path, pairs):\n"
              "    box = Box()\n"
              "    ref = weakref.ref(box, lambda _: signal.raise_signal(signal.SIGTERM))\n"
              "    del box  # the handler raises inside the callback\n"
              "    for _ in range(6000): time.sleep(0.01)  # 60 s of safe points\n"
              "    real(path, pairs)\n"
              "P.write_pairs = write_pairs\n"
              "from dift_sfm.cli import main\n"
              f"sys.exit(main(['pairs', 'exhaustive', {str(images)!r}, '-o', {str(out)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert "Interrupted; completed work is kept" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (["pairs", "sequential", "{images}", "-o", "{tmp}/p.txt", "--window", "0"],
     ["--window must be at least 1, got 0"]),
    (["pairs", "sequential", "{images}", "-o", "{tmp}/p.txt", "--window", "-3"],
     ["--window must be at least 1, got -3"]),
    (["pairs", "retrieval", "{images}", "-o", "{tmp}/p.txt", "--num-neighbors", "0"],
     ["--num-neighbors must be at least 1"]),
    (["reconstruct", "{images}", "-o", "{tmp}/out", "--pairs", "sequential", "--window", "0"],
     ["--window must be at least 1"]),
    (["match", "{tmp}/given_pairs.txt", "--features", "{tmp}/given.h5", "-o", "{tmp}/m.h5",
      "--set", "matcher.metric=hamming"], ["matcher.metric=\"hamming\"", "cosine, l2"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--device", "gpu"],
     ["--device: featurizer 'sift' has no device option"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--conf", "dift-sd", "--device", "gpu"],
     ["featurizer.device=\"gpu\" is not a torch device"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--max-keypoints", "-1"],
     ["keypoints.max_keypoints=-1 must be at least 1"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--max-keypoints", "0"],
     ["keypoints.max_keypoints=0 must be at least 1"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--set", "keypoints.max_keypoints=-5"],
     ["keypoints.max_keypoints=-5 must be at least 1"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--set", "keypoints.max_keypoints=0"],
     ["keypoints.max_keypoints=0"]),
    (["extract", "{images}", "-o", "{tmp}/f.h5", "--set", "featurizer=3"],
     ["'featurizer' names a whole section", "featurizer.name"]),
])
def test_bad_values_are_one_line_refusals(args, needles, images, tmp_path):
    """Tracebacks and accepted nonsense of the second campaign: one line each, no output."""
    if "{tmp}/given.h5" in args:
        feats = extract_features(get_conf("sift"), images, tmp_path / "given.h5")
        write_pairs(tmp_path / "given_pairs.txt", exhaustive_pairs(list_names(feats)))
    argv = [a.format(images=images, tmp=tmp_path) for a in args]
    line = _one_error(cli(*argv), *needles)
    assert "Did you mean 'featurizer'" not in line
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "m.h5").exists()
    assert not (tmp_path / "p.txt").exists()
    assert not [p for p in (tmp_path / "out").glob("*")]  # reconstruct: its folder stays empty


def test_bounds_are_declared_once_and_checked_by_resolve_conf():
    from dift_sfm.confs import BOUNDS

    assert "keypoints.max_keypoints" in BOUNDS
    for value in (-1, 0):
        with pytest.raises(ConfError, match="must be at least 1"):
            get_conf("sift", {"keypoints.max_keypoints": value})
    for name in ("gftt", "grid"):  # every detector with the option
        with pytest.raises(ConfError, match="max_keypoints"):
            resolve_conf({"keypoints": {"name": name, "max_keypoints": -2}})
    assert get_conf("sift", {"keypoints.max_keypoints": None})["keypoints"]["max_keypoints"] \
        is None  # null: no limit
    with pytest.raises(ConfError, match="ratio_threshold"):
        get_conf("sift", {"matcher.ratio_threshold": 1.5})
    for key in ("preprocessing.memory_mb", "preprocessing.detect_max"):
        with pytest.raises(ConfError, match=f"{key}=0 must be at least 1"):
            get_conf("dift-sd", {key: 0})
        assert get_conf("dift-sd", {key: None})["preprocessing"][key.split(".")[1]] is None
    from dift_sfm.matchers.mnn import METRICS  # the matcher's list is the bound's

    for metric in METRICS:
        assert get_conf("sift", {"matcher.metric": metric})["matcher"]["metric"] == metric


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_is_named(images, tmp_path):
    feats = extract_features(get_conf("sift"), images, tmp_path / "given.h5")
    write_pairs(tmp_path / "pairs.txt", exhaustive_pairs(list_names(feats)))
    result = cli("match", str(tmp_path / "pairs.txt"), "--features", str(feats), "-o",
                 str(tmp_path / "m.h5"), "--device", "cuda")
    _one_error(result, "Device 'cuda' is not available", "CPU-only")
    tiny_sd = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "sd" / "model"
    if tiny_sd.is_dir():  # was: "... is not a diffusers model folder"
        result = cli("extract", str(images), "-o", str(tmp_path / "sd.h5"), "--conf", "dift-sd",
                     "--model", str(tiny_sd), "--device", "cuda")
        line = _one_error(result, "Device 'cuda' is not available")
        assert "diffusers" not in line


def test_whitespace_in_an_image_name_is_refused_before_extraction(images, tmp_path):
    cv2.imwrite(str(images / "with space.png"), texture(200, 260, seed=9))
    out = tmp_path / "out"
    result = cli("reconstruct", str(images), "-o", str(out))
    _one_error(result, "'with space.png'", "whitespace", "rename")
    assert "Extracting" not in result.stderr and not list(out.glob("*.h5"))


def test_an_image_list_may_be_a_pipe(images, tmp_path):
    """`--image-list <(ls ...)`: the shell passes /dev/fd/N, a pipe."""
    read, write = os.pipe()
    os.write(write, b"1.png\n# a comment\n3.png\n")
    os.close(write)
    try:
        result = subprocess.run([sys.executable, "-m", "dift_sfm.cli", "extract", str(images),
                                 "-o", str(tmp_path / "f.h5"), "--image-list",
                                 f"/dev/fd/{read}"], env=ENV, capture_output=True, text=True,
                                pass_fds=(read,))
    finally:
        os.close(read)
    assert result.returncode == 0, result.stderr
    assert list_names(tmp_path / "f.h5") == ["1.png", "3.png"]


def _processes_naming(text: str) -> list[int]:
    """Ids of the processes whose environment holds ``text`` (Ray's workers rewrite their
    command line, "ray::DescribeWorker", but inherit the driver's environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if text.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours
            pass
    return found


@pytest.mark.slow
def test_sigterm_under_ray_is_ctrl_c_and_stops_the_cluster_it_started(shared_data, tmp_path):
    """`extract --ray` that started its own local cluster: SIGTERM ends it like Ctrl-C (no
    "SystemExit: 15", exit 130), the cluster's processes go with it, finished shards stay."""
    pytest.importorskip("ray")
    ray_tmp = Path(tempfile.mkdtemp(prefix="r18-", dir="/tmp"))  # short: Ray's socket paths
    out = tmp_path / "f.h5"
    args = ["extract", str(shared_data / "sacre_coeur"), "-o", str(out), "--set",
            "preprocessing.resize_max=480"]
    try:
        sigterm_cli([*args, "--ray", "--workers", "2"], out.with_name(out.name + ".parts"),
                    env={**ENV, "RAY_TMPDIR": str(ray_tmp)}, timeout=300)
        deadline = time.monotonic() + 60
        while _processes_naming(str(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _processes_naming(str(ray_tmp))  # gcs, raylet, workers: all stopped
    finally:
        for pid in _processes_naming(str(ray_tmp)):  # only if the assertion failed
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    done = [line for line in rerun.stderr.splitlines() if "already done" in line]
    assert done and " (0 already done)" not in done[0], rerun.stderr


def test_sigterm_while_another_swallowed_exception_is_printed_is_not_lost():
    """The handler fires inside the unraisable hook itself (printing another swallowed
    exception), where raising would be lost too: it is delivered once the hook returned."""
    result = _interrupt_probe(
        "printer = interrupts._previous_unraisablehook\n"
        "def printing(unraisable):\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    printer(unraisable)\n"
        "interrupts._previous_unraisablehook = printing\n"
        "class Box: pass\n"
        "box = Box()\n"
        "def fail(_): raise ValueError('another swallowed error')\n"
        "ref = weakref.ref(box, fail)\n",
        "del box")
    assert result.returncode == 130, result.stderr
    assert "another swallowed error" in result.stderr  # the other one is still printed
