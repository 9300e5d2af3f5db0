import shutil
import subprocess
import sys

import h5py
import pytest

from conftest import ROOT, make_cfg
from inversion.core import feature_cache
from inversion.core.errors import UserError
from inversion.extract import extraction


def test_missing_layer_is_named(tiny_zip, tmp_path):
    cfg = make_cfg(tmp_path, tiny_zip, "layers=[fc8]")
    extraction.extract(cfg)
    with pytest.raises(UserError, match="no layer 'conv2'"):
        feature_cache.open_for(cfg, ["conv2"])


def test_reading_a_blosc2_cache_without_hdf5plugin_is_one_line_naming_it(built, tmp_path):
    cfg, _ = built
    cfg = dict(cfg, **{"cache.dir": str(tmp_path), "cache.compression": "blosc2-zstd"})
    extraction.extract(cfg)
    code = (f"import sys; sys.modules['hdf5plugin'] = None; sys.path.insert(0, {str(ROOT)!r}); import h5py\n"
            f"from inversion.core import feature_cache, errors\n"
            f"try:\n    feature_cache.open_for({cfg!r})\nexcept errors.UserError as e:\n    print(e)\n"
            f"with h5py.File({str(feature_cache.path_for(cfg))!r}) as f:\n"
            f"    try:\n        f['train/fc6'][0]\n    except OSError as e:\n        print('h5py alone:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"cache {feature_cache.path_for(cfg)} is compressed with Blosc2") and \
        "HDF5 filter 32026" in lines[0] and lines[0].endswith("pip install hdf5plugin"), out
    assert lines[1].startswith("h5py alone:"), out  # the check is needed: h5py cannot read it either


def test_list_caches_tells_them_apart_and_marks_this_configs(built, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import extract_features
    from inversion.core import console

    cfg, reference = built
    folder = tmp_path / "caches"
    lzf = extraction.extract(dict(cfg, **{"cache.dir": str(folder), "cache.compression": "lzf", "seed": 1}))
    shutil.copy(reference, folder / reference.name)
    partial = folder / "features-0123456789abcdef.h5.partial"
    shutil.copy(reference, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"], f["train"].attrs["done"], f["eval"].attrs["done"] = False, 10, 0
    args = [a for key in ("data.path", "encoder.weights", "split.num_classes", "split.eval_per_class",
                          "split.train_per_class", "cache.dtype") for a in ("--set", f"{key}={cfg[key]}")]
    (tmp_path / "c.yaml").write_text("{}\n")
    monkeypatch.setattr(console.console, "_width", 200)  # wide enough that no cell wraps, whatever the terminal
    result = CliRunner().invoke(extract_features.app, ["--list-caches", "--config", str(tmp_path / "c.yaml"),
                                                       "--set", f"cache.dir={folder}", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    blocks, table = [[]], result.output[result.output.index("┡"):result.output.index("└")].splitlines()[1:]
    for line in table:  # one block of lines per cache, between the rules
        blocks.append([]) if line.startswith("├") else blocks[-1].append(line.split("│")[1:-1])
    text = {"".join(cells[1] for cells in block).split()[0]: " ".join(" ".join(c.strip() for c in cells) for cells in block)
            for block in blocks}
    assert set(text) == {reference.name, lzf.name, partial.name}, result.output
    assert all("AlexNet random init, not ImageNet-pretrained" in t and "3 classes, 64x64 px" in t
               and "18 train + 6 eval images" in t and "conv2, conv5, fc6, fc8" in t for t in text.values())
    assert "compression lzf" in text[lzf.name] and "seed 1" in text[lzf.name] and "complete" in text[lzf.name]
    assert "float32, compression none" in text[reference.name] and "partial: 10 of 24 images" in text[partial.name]
    marked = [line for line in result.output.splitlines() if line.startswith("│ * ")]
    assert len(marked) == 1 and reference.name in marked[0]
    assert "3 caches" in result.output.splitlines()[-1] and reference.name in result.output.splitlines()[-1]
