import pytest

from conftest import ROOT
from inversion.core import config
from inversion.core.errors import UserError


def test_config_yaml_holds_exactly_the_defaults():
    assert config.load(ROOT / "config.yaml") == config.defaults()


def test_set_overrides_parse_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    cfg = config.load(path, ["train.lr=3e-4", "layers=[conv2, fc8]", "split.train_per_class=10", "data.path=null"])
    assert cfg["train.epochs"] == 3 and cfg["train.lr"] == 3e-4
    assert cfg["layers"] == ["conv2", "fc8"] and cfg["split.train_per_class"] == 10 and cfg["data.path"] is None


@pytest.mark.parametrize("override, fragment", [
    ("nope.key=1", "unknown config key 'nope.key'"),
    ("train.epochs=many", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("split.num_classes=0", "split.num_classes"),
    ("split.eval_per_class=0", "split.eval_per_class"),
    ("split.train_per_class=0", "split.train_per_class"),
    ("data.format=coco", "data.format"),
    ("data.image_size=100", "a power of two >= 16"),
    ("data.image_size=8", "data.image_size"),
    ("layers=[conv2, conv9]", "unknown layer 'conv9'"),
    ("layers=[]", "layers"),
    ("cache.dtype=int8", "cache.dtype"),
    ("train.epochs", "key=value"),
    ("train.checkpoint_minutes=0", "train.checkpoint_minutes: invalid value 0"),
    ("train.checkpoint_minutes=true", "train.checkpoint_minutes"),
    ("optimisation.layers={conv5: {lamda_tv: 10}}", "optimisation.layers.conv5.lamda_tv: unknown key"),
    ("optimisation.layers={conv5: {jitter: -1}}", "optimisation.layers.conv5.jitter: invalid value -1"),
    ("optimisation.layers={conv5: {iterations: true}}", "optimisation.layers.conv5.iterations"),
    ("optimisation.layers={conv5: {optimizer: lbfgs}}", "optimisation.layers.conv5.optimizer"),
    ("optimisation.layers={conv5: {layers: {}}}", "optimisation.layers.conv5.layers: unknown key"),
    ("optimisation.layers={conv5: 3}", "optimisation.layers.conv5: invalid value 3"),
    ("optimisation.layers=[conv5]", "optimisation.layers: invalid value"),
    ("optimisation.layers={conv9: {jitter: 1}}", "optimisation.layers: unknown layer 'conv9'"),
    ("optimisation.layers.conv5.lr=-1", "optimisation.layers.conv5.lr"),
    ("optimisation.layers.conv5=1", "optimisation.layers.<layer>.<key>"),
])
def test_bad_values_name_the_key(tmp_path, override, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        config.load(ROOT / "config.yaml", [override])


def test_per_layer_optimisation_settings_from_the_file_and_set(tmp_path):
    """A nested mapping in the file, a YAML flow mapping or one dotted entry on the command line."""
    path = tmp_path / "c.yaml"
    path.write_text("optimisation:\n  lr: 0.01\n  layers:\n    conv5:\n      jitter: 4\n      lambda_alpha: 1e-4\n")
    cfg = config.load(path, ["optimisation.layers.fc6.iterations=500", "optimisation.layers.conv5.lambda_tv=10"])
    assert cfg["optimisation.layers"] == {"conv5": {"jitter": 4, "lambda_alpha": 1e-4, "lambda_tv": 10},
                                          "fc6": {"iterations": 500}}
    assert cfg["optimisation.lr"] == 0.01 and cfg["optimisation.jitter"] == 2
    cfg = config.load(path, ["optimisation.layers={conv5: {lambda_tv: 10, jitter: 4}}"])  # replaces the file's
    assert cfg["optimisation.layers"] == {"conv5": {"lambda_tv": 10, "jitter": 4}}
    defaults = config.defaults()["optimisation.layers"]  # the sweep's per-layer values, a fresh copy each time
    assert defaults == {"conv5": {"lambda_tv": 0.3, "iterations": 800}, "fc6": {"lambda_tv": 0.3, "iterations": 800}}
    defaults["conv5"]["lambda_tv"] = 99
    assert config.defaults()["optimisation.layers"]["conv5"]["lambda_tv"] == 0.3


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  num_clases: 3\n")
    with pytest.raises(UserError, match="split.num_clases"):
        config.load(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere.yaml"):
        config.load(tmp_path / "nowhere.yaml")


def test_cache_name_depends_only_on_the_settings_that_shape_it():
    from inversion.core import feature_cache

    a = config.defaults()
    assert feature_cache.path_for(a) == feature_cache.path_for(dict(a))
    assert feature_cache.path_for(a) != feature_cache.path_for(dict(a, seed=1))
    assert feature_cache.path_for(a) != feature_cache.path_for(dict(a, **{"cache.dtype": "float32"}))
    assert feature_cache.path_for(a) != feature_cache.path_for(dict(a, **{"data.image_size": 128}))
    assert feature_cache.path_for(a) != feature_cache.path_for(dict(a, **{"data.format": "imagefolder"}))
    assert feature_cache.path_for(a) == feature_cache.path_for(dict(a, **{"train.lr": 1.0, "data.path": "x"}))


def test_split_sizes_have_no_fixed_upper_bound():
    """The data decides how many classes and images there are (ImageNet: 1,000 classes, ~1,300 each)."""
    cfg = config.load(ROOT / "config.yaml", ["split.num_classes=1000", "split.eval_per_class=100",
                                             "split.train_per_class=1300", "data.image_size=256"])
    assert (cfg["split.num_classes"], cfg["split.train_per_class"], cfg["data.image_size"]) == (1000, 1300, 256)
