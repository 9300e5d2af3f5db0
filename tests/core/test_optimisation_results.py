"""The optimisation baseline's results file as render reads it: only results made on this very cache's eval
images count, and budgets and iteration counts read right for every layer."""

import json

from inversion.core import optimisation_results as results


def _result(**changes):
    layer = {"decoder": {"training_seconds": 12.3, "epochs": 3, "seconds_per_image": 0.001},
             "optimisation": {"seconds_per_image": 1.5, "final_relative_drop": 0.0123,
                              "settings": {"iterations": 300}}}
    return {"cache_hash": "abc", "split": "eval", "settings": {"iterations": 100},
            "layers": {"conv2": json.loads(json.dumps(layer)), "fc8": json.loads(json.dumps(layer))}, **changes}


def test_stored_results_count_only_for_this_caches_eval_images(tmp_path):
    path = tmp_path / results.RESULTS
    assert results.stored(path, "abc") is None  # no file
    path.write_text("{not json")
    assert results.stored(path, "abc") is None
    for other, wanted in ((_result(), "abc"), (_result(), "other cache"), (_result(split="train"), "abc"),
                          (_result(layers={}), "abc")):
        path.write_text(json.dumps(other))
        assert (results.stored(path, wanted) is not None) == bool(other["split"] == "eval" and other["layers"]
                                                                   and wanted == "abc")


def test_iterations_and_budgets_read_per_layer_and_from_older_files():
    result = _result()
    assert results.iterations_text(result) == "300 iterations"
    result["layers"]["fc8"]["optimisation"]["settings"]["iterations"] = 800
    assert results.iterations_text(result) == "iterations conv2 300, fc8 800"
    del result["layers"]["conv2"]["optimisation"]["settings"]  # stored before per-layer settings: the global ones
    assert results.iterations_text(result) == "iterations conv2 100, fc8 800"
    assert results.budget(result, "fc8", "optimisation") == ("800 iterations, 1.5 s/image", "1.23%")
    assert results.budget(result, "fc8", "optimisation", short=True) == ("800 it.", "1.23%")
    assert results.budget(result, "fc8", "decoder") == ("3 epochs, 12 s training (once)", "-")
    del result["layers"]["fc8"]["decoder"]["training_seconds"]
    assert results.budget(result, "fc8", "decoder") == ("-", "-")
