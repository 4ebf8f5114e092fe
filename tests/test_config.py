import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import exits_2_with, invoke
from test_ingest import snapshot

from radpath_fs.config import PipelineConfig, load_config, parse_config
from radpath_fs.errors import ConfigError
from radpath_fs.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_cpm2020_holds_the_papers_numbers():
    cfg = load_config(ROOT / "pipelines/cpm2020.yaml")
    assert cfg.tile.tile_size == 512
    assert cfg.tile.background_threshold == 180 and cfg.tile.background_fraction == 0.75
    assert cfg.tile.magnifications == [20, 10, 5, 2.5]  # 40x discarded, as in the paper
    assert cfg.embed.name == "efficientnet_b0" and cfg.embed.input_size == 224
    w = cfg.wsi
    assert (w.slides_per_batch, w.tiles_per_slide, w.crop_size) == (4, 50, 224)
    assert (w.color_jitter.brightness, w.color_jitter.contrast, w.color_jitter.saturation, w.color_jitter.hue) == (
        0.1, 0.1, 0.1, 0.01)
    assert (w.lr, w.epochs, w.head.dropout) == (5e-5, 50, 0.5)
    assert w.snapshot_epochs() == [39, 49]
    assert (cfg.predict.tiles_per_slide, cfg.predict.repeats) == (200, 10)
    m = cfg.mri
    assert (m.network, m.spatial_size, m.lr, m.epochs, m.batch_size) == ("densenet169", (128, 128, 128), 5e-4, 200, 3)
    assert (m.zoom, m.rotate_degrees, m.elastic_sigma, m.elastic_magnitude) == (
        (0.8, 1.2), 10.0, (1.0, 10.0), (10.0, 200.0))
    assert m.snapshot_epochs() == [189, 199]
    assert (cfg.fusion.method, cfg.fusion.prune) == ("prune", 2)


def test_defaults_equal_the_recipe_file_except_where_the_file_says_why():
    default = PipelineConfig()
    cfg = load_config(ROOT / "pipelines/cpm2020.yaml")
    assert cfg.wsi == default.wsi and cfg.mri == default.mri and cfg.predict == default.predict


def test_demo_pipeline_loads():
    cfg = load_config(ROOT / "pipelines/demo.yaml")
    assert cfg.wsi.mode == "head" and cfg.data.synth is not None


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"wsi": {"lrr": 1}}, "wsi.lrr", "unknown key"),
        ({"tile": {"background_fraction": 2}}, "tile.background_fraction", "less than or equal to 1"),
        ({"tile": {"magnifications": [20, -5]}}, "tile.magnifications", "positive"),
        ({"mri": {"modalities": ["t1", "dwi"]}}, "mri.modalities", "unknown modalities"),
        ({"wsi": {"epochs": 5, "snapshots": [-1, -11]}}, "wsi", "outside 1..5"),
        ({"fusion": {"method": "magic"}}, "fusion.method", "soft_vote"),
        ({"data": {"synth": {"class_proportions": {"X": 1}}}}, "data.synth.class_proportions", "unknown classes"),
        ({"bogus_section": {}}, "bogus_section", "unknown key"),
        ({"scheduler": "local4"}, "scheduler", "expected one of sync, threads, processes, local:N"),
        ({"embed": {"weights_tag": "efficientnet_b0.ra_in1k"}}, "embed", "set weights: to that file"),
        ({"embed": {"weights": "w/b0.safetensors", "weights_tag": "efficientnet_b0.ra_in1k"}}, "embed",
         "named efficientnet_b0.safetensors"),
        ({"embed": {"weights": "weights/efficientnet_b0.safetensors", "weights_tag": "resnet18.a1_in1k"}}, "embed",
         "not a tag of the embedder"),
        ({"embed": {"weights": "random", "pretrained": True}}, "embed", "not both"),
        ({"embed": {"normalization": "slide"}}, "embed.normalization", "'preset', 'dataset' or 'imagenet'"),
    ],
)
def test_config_errors_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(data, "my.yaml")
    msg = str(e.value)
    assert f"my.yaml: {key}" in msg and words in msg


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:builtins.open",
                                 "!!python/name:os.system"])
def test_yaml_is_safe_loaded(tmp_path, tag):
    """A `!!python/...` tag builds no Python object: loading the file, and every command that reads
    a config, stops at it with one error naming the file and leaves the store as it was."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"seed: {tag} ['touch {marker}']\n" if "name:" not in tag else f"seed: {tag}\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config(evil)
    st = Store(tmp_path / "store", create=True)
    before = snapshot(tmp_path / "store")
    for argv in (["run", evil], ["tile", "--store", st.root, "--config", evil]):
        exits_2_with(invoke(argv), f"{evil}: not valid YAML", "python/")
    assert not marker.exists() and snapshot(tmp_path / "store") == before


def test_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "absent.yaml")


def test_cli_reports_config_error_with_exit_2(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("tile:\n  tile_sise: 256\n")
    r = subprocess.run([sys.executable, "-m", "radpath_fs.cli", "run", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "typo.yaml: tile.tile_sise: unknown key" in r.stderr


def test_cpm2020_marks_this_projects_choices():
    """Each value the paper does not give says `# ours` on its line; the paper's own numbers do not."""
    lines = (ROOT / "pipelines/cpm2020.yaml").read_text().splitlines()
    section, marked = None, {}
    for line in lines:
        if line and not line.startswith((" ", "#")):
            section = line.split(":")[0]
        elif line.startswith("  ") and not line.lstrip().startswith("#") and ":" in line:
            marked[f"{section}.{line.split(':')[0].strip()}"] = "# ours" in line
    ours = ["ingest.folds", "ingest.seed", "tile.codec", "embed.weights_tag", "embed.crop", "predict.repeats",
            "mri.spatial_size", "mri.lr_schedule", "mri.zoom_prob", "mri.rotate_prob", "mri.elastic_prob", "fusion.bootstrap"]
    papers = ["tile.tile_size", "tile.background_threshold", "wsi.lr", "wsi.epochs", "wsi.tiles_per_slide",
              "predict.tiles_per_slide", "mri.flip_prob", "mri.lr", "mri.epochs", "mri.batch_size", "fusion.prune"]
    assert [k for k in ours if not marked[k]] == []
    assert [k for k in papers if marked[k]] == []
