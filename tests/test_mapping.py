"""The three COLMAP mappers (``reconstruct --mapper incremental|global|hierarchical``).

On the Sacre Coeur photos of ../shared/data (skipped when absent): the CLI with the global
mapper, then the hierarchical one on the same database through the Python function that
`colmap-import` users call. Bad mapper names and options fail before any work.
"""

from __future__ import annotations

from pathlib import Path

import pycolmap
import pytest

from dift_sfm.cli import main as cli_main
from dift_sfm.colmap import MAPPERS
from dift_sfm.colmap.mapping import (
    check_mapper,
    mapper_options,
    run_mapping,
    summarize_model,
)
from dift_sfm.confs import get_conf
from dift_sfm.errors import DiftSfmError
from dift_sfm.sfm import reconstruct, run_pipeline

SACRE_COEUR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacre_coeur"


def test_mapper_names_and_options():
    assert MAPPERS == ("incremental", "global", "hierarchical")
    for name in MAPPERS:
        assert check_mapper(name) == name
    with pytest.raises(DiftSfmError, match="Unknown mapper 'glomap': use one of incremental, "
                                           "global, hierarchical"):
        check_mapper("glomap")
    inc = mapper_options("incremental", 4)
    assert isinstance(inc, pycolmap.IncrementalPipelineOptions)
    assert inc.random_seed == 0 and inc.min_model_size == 4
    glo = mapper_options("global", 40, min_model_size=7)
    assert isinstance(glo, pycolmap.GlobalPipelineOptions)
    assert glo.random_seed == 0 and glo.min_model_size == 7
    assert glo.mapper.rotation_averaging.random_seed == 0
    assert glo.mapper.global_positioning.random_seed == 0
    hie = mapper_options("hierarchical", 40)
    assert isinstance(hie, pycolmap.HierarchicalPipelineOptions)
    assert hie.incremental_options.random_seed == 0
    assert hie.incremental_options.min_model_size == 10


def test_bad_mapper_is_refused_before_any_work(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(DiftSfmError, match="Unknown mapper 'glob'"):
        run_pipeline(get_conf("sift"), images, tmp_path / "out", mapper="glob")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DiftSfmError, match="Unknown mapper 'glob'"):
        reconstruct(tmp_path / "sfm", images, tmp_path / "p.txt", tmp_path / "f.h5",
                    tmp_path / "m.h5", mapper="glob")
    assert not (tmp_path / "sfm").exists()
    with pytest.raises(SystemExit) as exc:
        cli_main(["reconstruct", str(images), "-o", str(tmp_path / "out"), "--mapper", "glob"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --mapper: invalid choice: 'glob'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.shared
def test_reconstruct_global_mapper_on_sacre_coeur(tmp_path, capsys, caplog):
    if not SACRE_COEUR.is_dir():
        pytest.skip(f"{SACRE_COEUR} is absent (the shared data folder beside the checkout)")
    out = tmp_path / "sc"
    code = cli_main(["reconstruct", str(SACRE_COEUR), "-o", str(out), "--mapper", "global",
                     "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "mapper                  global" in printed
    rec = pycolmap.Reconstruction(out / "sparse" / "0")
    summary = summarize_model(rec, out / "database.db", out)
    assert summary.num_images == 10
    assert summary.num_registered >= 9, summary.format()
    assert summary.num_points3D > 300
    assert 0 < summary.mean_reprojection_error < 1.5
    assert f"registered images       {summary.num_registered} / 10" in printed
    assert f"3D points               {summary.num_points3D}" in printed
    assert f"{summary.mean_reprojection_error:.3f} px" in printed

    # colmap-import users: map an existing, verified database with another mapper
    db = out / "database.db"
    for mapper in ("hierarchical", "incremental"):
        sfm = out / f"map-{mapper}"
        models = run_mapping(db, SACRE_COEUR, sfm, mapper=mapper)
        assert models[0].num_reg_images() >= 9, mapper
        assert models[0].compute_mean_reprojection_error() < 1.5
        assert (sfm / "sparse" / "0" / "points3D.bin").is_file()
        assert not (sfm / "sparse.tmp").exists()
    # existing hloc files (e.g. those a colmap-import user has): `reconstruct --features`
    # maps them in a new database with the mapper asked for, nothing extracted or matched
    files = ["--features", str(out / "feats-sift.h5"), "--matches",
             str(out / "feats-sift_matches.h5"), "--pairs", str(out / "pairs-exhaustive.txt")]
    again = tmp_path / "from-files"
    assert cli_main(["reconstruct", str(SACRE_COEUR), "-o", str(again), *files,
                     "--mapper", "hierarchical", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "mapper                  hierarchical" in printed
    assert sorted(p.name for p in again.iterdir() if p.suffix == ".h5") == []  # none computed
    assert pycolmap.Reconstruction(again / "sparse" / "0").num_reg_images() >= 9
    assert (again / "report.html").is_file()
    for extra, says in (([*files, "--set", "keypoints.max_keypoints=9"], "--set only applies"),
                        ([*files, "--ray"], "--ray only applies when"),
                        ([*files[:2], *files[4:]], "--features and --matches go together"),
                        ([*files[:4], "--pairs", "exhaustive"], "must be the pairs file")):
        caplog.clear()
        assert cli_main(["reconstruct", str(SACRE_COEUR), "-o", str(tmp_path / "bad"),
                         *extra]) == 1
        assert says in caplog.text, caplog.text
    assert not (tmp_path / "bad").exists()

    # options of another mapper are refused before mapping
    with pytest.raises(DiftSfmError, match="Mapper 'global' takes pycolmap.GlobalPipelineOptions"):
        run_mapping(db, SACRE_COEUR, out / "bad", options=pycolmap.IncrementalPipelineOptions(),
                    mapper="global")
    assert not (out / "bad" / "sparse").exists()
