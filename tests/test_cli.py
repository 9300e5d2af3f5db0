"""The three command lines: bad input is one line on stderr, a non-zero exit code, no traceback."""

import importlib
import json

import h5py
import pytest
import torch
from typer.testing import CliRunner

from conftest import WNIDS, pixel_size, write_tiny_imagenet

runner = CliRunner()


def invoke(script, *args):
    app = importlib.import_module(script).app
    return runner.invoke(app, list(args))


def one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]] and fragment in lines[-1], result.output
    assert "Traceback" not in result.output


@pytest.fixture
def cfg_file(tmp_path, tiny_zip):
    path = tmp_path / "config.yaml"
    path.write_text(f"data: {{path: {tiny_zip}}}\ncache: {{dir: {tmp_path}/cache}}\noutput: {{dir: {tmp_path}/out}}\n"
                    f"encoder: {{weights: random}}\nsplit: {{num_classes: 2, eval_per_class: 1, train_per_class: 2}}\n"
                    f"decoder: {{fc_width: 64}}\n")
    return str(path)


@pytest.mark.parametrize("args, fragment", [
    (["--set", "data.path=/nowhere/tiny.zip"], "/nowhere/tiny.zip"),
    (["--set", "layers=[conv2,pool9]"], "pool9"),
    (["--set", "split.num_classes=0"], "split.num_classes"),
    (["--set", "split.num_classes=201"], "split.num_classes: 201 is outside 1..5"),
    (["--set", "split.eval_per_class=51"], "split.eval_per_class: class n0000000"),
    (["--set", "split.eval_per_class=51"], "has 3 val images, 51 requested"),
    (["--set", "data.format=imagefolder"], "no train/<class>/<image> found"),
    (["--set", "data.image_size=48"], "data.image_size"),
    (["--set", "split.num_classes=6"], "split.num_classes: 6 is outside 1..5"),
    (["--set", "unknown=1"], "unknown"),
])
def test_extract_bad_input(cfg_file, args, fragment):
    one_line_error(invoke("extract_features", "--config", cfg_file, *args), fragment)


def test_extract_bad_files(cfg_file, tmp_path):
    nowinds = write_tiny_imagenet(tmp_path / "nowinds.zip", with_wnids=False)
    one_line_error(invoke("extract_features", "--config", cfg_file, "--set", f"data.path={nowinds}"), "wnids.txt")
    member = f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"
    corrupt = write_tiny_imagenet(tmp_path / "corrupt.zip", corrupt=member)
    one_line_error(invoke("extract_features", "--config", cfg_file, "--set", f"data.path={corrupt}",
                          "--set", "split.num_classes=5"), member)
    assert not any((tmp_path / "cache").glob("*.h5*"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "w.pth")
    one_line_error(invoke("extract_features", "--config", cfg_file, "--set", f"encoder.weights={tmp_path}/w.pth"),
                   "does not fit")
    one_line_error(invoke("extract_features", "--config", str(tmp_path / "none.yaml")), "none.yaml")


def test_a_zero_objective_is_refused_before_any_work(cfg_file, tmp_path):
    result = invoke("train_decoders", "--config", cfg_file, "--set", "loss.pixel=0")
    one_line_error(result, "loss.pixel, loss.feature and loss.adversarial are all 0")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    # a setting of training only: the other commands take the same config
    assert invoke("extract_features", "--config", cfg_file, "--set", "loss.pixel=0", "--list-caches").exit_code == 0


def test_pipeline_commands_and_their_errors(cfg_file, tmp_path):
    one_line_error(invoke("train_decoders", "--config", cfg_file), "extract_features.py")
    one_line_error(invoke("render", "--config", cfg_file), "extract_features.py")
    assert invoke("extract_features", "--config", cfg_file, "--set", "layers=[conv5]").exit_code == 0
    one_line_error(invoke("train_decoders", "--config", cfg_file, "--layers", "conv2,conv7"), "conv7")
    one_line_error(invoke("train_decoders", "--config", cfg_file, "--set", "layers=[conv5]", "--layers", "fc6"),
                   "no layer 'fc6'")
    one_line_error(invoke("render", "--config", cfg_file, "--set", "layers=[conv5]"), "train_decoders.py")
    result = invoke("train_decoders", "--config", cfg_file, "--set", "layers=[conv5]", "--set", "train.epochs=1")
    assert result.exit_code == 0 and "trained: " in result.output
    result = invoke("render", "--config", cfg_file, "--set", "layers=[conv5]", "--num-images", "2")
    assert result.exit_code == 0 and "rendered: " in result.output
    assert (tmp_path / "out" / "results.md").exists()


def test_describe_prints_four_tables_without_a_cache(cfg_file):
    result = invoke("train_decoders", "--config", cfg_file, "--describe")
    assert result.exit_code == 0
    for layer in ("conv2", "conv5", "fc6", "fc8"):
        assert f"{layer} decoder (input" in result.output


def test_list_layers_prints_nodes_with_shapes_and_exits(cfg_file, tmp_path):
    result = invoke("extract_features", "--config", cfg_file, "--list-layers")
    assert result.exit_code == 0 and not (tmp_path / "cache").exists()
    row = next(line for line in result.output.splitlines() if "features.5" in line)
    assert "conv2" in row and "192x13x13" in row and "64,896" in row  # float16 bytes per image
    result = invoke("extract_features", "--config", cfg_file, "--list-layers", "--set", "encoder.arch=resnet18",
                    "--set", "encoder.input_size=64")
    assert result.exit_code == 0 and any("layer4.1.relu_1" in l and "512x2x2" in l for l in result.output.splitlines())


@pytest.mark.parametrize("args, fragment", [
    (["--set", "encoder.arch=resnet19"], "nearest: resnet18"),
    (["--set", "encoder.arch=resnet18", "--set", "layers=[layer9]"], "'layer9' is not a node"),
    (["--set", "encoder.arch=resnet18", "--set", "layers=all"], "`all` is defined for alexnet only"),
    (["--set", "encoder.arch=shufflenet_v2_x0_5", "--set", "layers=[stage2.0.size]"], "not one tensor"),
])
def test_bad_arch_and_nodes(cfg_file, tmp_path, args, fragment):
    one_line_error(invoke("extract_features", "--config", cfg_file, *args), fragment)
    assert not (tmp_path / "cache").exists()


def test_all_eight_alexnet_layers_end_to_end(cfg_file, tmp_path):
    """layers=all on the tiny data: every layer extracted, trained, and a grid column each."""
    from PIL import Image

    from inversion.core import figures

    common = ["--config", cfg_file, "--set", "layers=all", "--set", "train.epochs=1"]
    assert invoke("extract_features", *common).exit_code == 0
    assert invoke("train_decoders", *common).exit_code == 0
    assert invoke("render", *common, "--num-images", "2").exit_code == 0
    import json
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["layers"]) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    with Image.open(tmp_path / "out" / "reconstructions.png") as im:
        assert im.size == pixel_size(figures.comparison_inches(2, 9))  # original + eight layers


def test_an_image_folder_at_128_pixels_end_to_end(tmp_path):
    """The three commands on a zip of odd-sized images without val/: 128 px cache, decoders, figures."""
    from PIL import Image

    from inversion.core import checkpoints, figures, synthetic

    folders = synthetic.write_imagefolder(tmp_path / "folders.zip", classes=3, train_per_class=6)
    args = ["--set", f"data.path={folders}", "--set", "data.format=auto", "--set", "data.image_size=128",
            "--set", f"cache.dir={tmp_path}/cache", "--set", f"output.dir={tmp_path}/out",
            "--set", "encoder.weights=random", "--set", "split.num_classes=3", "--set", "split.eval_per_class=2",
            "--set", "layers=[conv2,fc8]", "--set", "train.batch_size=4", "--set", "train.epochs=1",
            "--set", "render.num_images=3", "--set", "render.grid_size=2", "--set", "device=cpu",
            "--set", "decoder.fc_width=64"]
    result = invoke("extract_features", *args)
    assert result.exit_code == 0, result.output
    assert "imagefolder layout, detected" in result.output and "expected cache size:" in result.output
    cache, = (tmp_path / "cache").glob("features-*.h5")
    with h5py.File(cache) as f:
        assert f["train/images"].shape == (3 * 4, 128, 128, 3) and f["eval/images"].shape == (3 * 2, 128, 128, 3)
        assert not set(f["train/paths"][()]) & set(f["eval/paths"][()])
    result = invoke("train_decoders", *args)
    assert result.exit_code == 0, result.output
    model, checkpoint = checkpoints.load_decoder(tmp_path / "out/decoders/conv2/best.pt")
    assert checkpoint["decoder"]["out_size"] == 128
    assert model(torch.zeros(1, 192, 13, 13)).shape == (1, 3, 128, 128)
    result = invoke("render", *args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert set(metrics["layers"]) == {"conv2", "fc8"} and metrics["eval_images"] == 6
    assert all(0 < v["mse"] < 1 for v in [*metrics["layers"].values(), *metrics["baselines"].values()])
    assert {"reconstructions.png", "grid_conv2.png", "grid_fc8.png"} <= set(metrics["figures"])
    with Image.open(tmp_path / "out/reconstructions.png") as im:  # cells grow with the images: 2 x 1.1 in
        assert im.size == pixel_size(figures.comparison_inches(3, 3, 128)) and im.size[0] > 3 * 2 * 110
    with Image.open(tmp_path / "out/grid_conv2.png") as im:
        assert im.size == (2000, 1120)
    result = invoke("train_decoders", *args, "--describe", "--layers", "conv2")
    assert "128x128" in result.output


def test_list_layers_prints_whole_node_names_into_a_pipe_at_80_columns(cfg_file):
    """A name is there to be copied into `layers=[...]`: never cut, whatever the terminal."""
    app = importlib.import_module("extract_features").app
    run = runner.invoke(app, ["--config", cfg_file, "--list-layers", "--set", "encoder.arch=vit_b_16"],
                        env={"COLUMNS": "80"})  # not a terminal, and 80 columns
    assert run.exit_code == 0, run.output
    rows = {line.split()[0]: line for line in run.stdout.splitlines()[2:]}
    assert "tokens 1+14x14 x 768" in rows["encoder.layers.encoder_layer_11.add_1"] and "197x768" in rows["encoder.ln"]
    assert "C x H x W" in rows["conv_proj"] and "vector" in rows["heads.head"]
    assert "…" not in run.stdout and "getattr" not in rows and "reshape" not in rows
    assert max(map(len, run.stdout.splitlines())) > 80 and "--all-nodes" in run.stderr


def test_all_nodes_lists_the_rest_with_why(cfg_file):
    result = invoke("extract_features", "--config", cfg_file, "--list-layers", "--all-nodes",
                    "--set", "encoder.arch=vit_b_16")
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if line.startswith("reshape "))
    assert "neither tokens on a square grid" in row
    result = invoke("extract_features", "--config", cfg_file, "--set", "encoder.arch=maxvit_t", "--set",
                    "layers=[blocks.0.layers.0.layers.window_attention.partition_op.reshape]")
    one_line_error(result, "5-D per image")


@pytest.mark.parametrize("arch, node, channels", [("swin_t", "features.5", "384"),
                                                 ("vit_b_16", "encoder.layers.encoder_layer_5", "768")])
def test_describe_shows_the_node_as_channels_by_grid(cfg_file, arch, node, channels):
    result = invoke("train_decoders", "--config", cfg_file, "--describe", "--set", f"encoder.arch={arch}",
                    "--set", f"layers=[{node}]")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("│ input "))
    assert [cell.strip() for cell in row.split("│")][4:6] == [channels, "14x14"]
