"""``--weights imagenet``: Keras's published weights, found and fetched as Keras does.

A local HTTP server on 127.0.0.1 stands in for Keras's host (``CONVLENS_WEIGHTS_URL``);
``KERAS_HOME`` points at a fresh folder. The published hashes of the real files cannot be
met by files made here, so the tests give the weights table an entry for a file they make
(its own hash); that the table holds what Keras itself asks for is checked against Keras.
"""

import hashlib
import http.server
import os
import threading
from functools import partial

import numpy as np
import pytest

from convlens.models import hub, zoo
from tests.test_cli import run as cli


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/cut/"):  # an interrupted download: half the bytes, then the end
            path = os.path.join(self.directory, self.path[len("/cut/"):])
            data = open(path, "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(www)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _error_line(err: str) -> str:
    """The one error line after the download's progress bar (which tqdm draws on stderr)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_weights(tmp_path, monkeypatch):
    """``vgg_tiny`` given a published-weights entry for a file made here (Keras's layout)."""
    from convlens.models import registry
    from convlens.models.keras_io import save_h5_model
    from convlens.models.registry import load_model
    from convlens.models.vgg import vgg_config
    model, params = load_model("vgg_tiny", random_init=3)
    path = tmp_path / "made" / "vgg_tiny_weights.h5"
    path.parent.mkdir()
    save_h5_model(model, params, path, vgg_config((2, 2, 3, 3, 3), (4, 8, 16, 32, 32), hidden=32, name="vgg_tiny",
                                                   input_shape=(32, 32, 3)))
    entry = {"fname": path.name, "url": hub.KERAS_BASE + "vgg_tiny/" + path.name, "hash": _md5(path)}
    spec = registry.MODELS["vgg_tiny"]
    import dataclasses
    monkeypatch.setitem(registry.MODELS, "vgg_tiny", dataclasses.replace(spec, imagenet=lambda top: entry))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return path, entry, params


def test_cache_hit_needs_no_network(tiny_weights, monkeypatch, capsys):
    path, entry, params = tiny_weights
    cache = hub.cache_dir()
    cache.mkdir(parents=True)
    (cache / entry["fname"]).write_bytes(path.read_bytes())  # as if Keras had fetched it once
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", "http://127.0.0.1:9/")  # nothing listens there
    code, out, err = cli(["summary", "vgg_tiny", "--weights", "imagenet"], capsys)
    assert code == 0, err
    assert str(cache / entry["fname"]) in out


def test_download_checks_the_hash_and_renames_atomically(tiny_weights, server, monkeypatch, capsys):
    from convlens.models.registry import load_model
    path, entry, params = tiny_weights
    www, url = server
    (www / "vgg_tiny").mkdir()
    (www / "vgg_tiny" / entry["fname"]).write_bytes(path.read_bytes())
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", url)
    model, got = load_model("vgg_tiny", weights="imagenet", progress=False)
    cached = hub.cache_dir() / entry["fname"]
    assert cached.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in hub.cache_dir().iterdir()) == [entry["fname"]]  # no partial file left
    np.testing.assert_array_equal(got["block1_conv1"]["kernel"], params["block1_conv1"]["kernel"])
    assert model.load_args["weights"] == "imagenet" and model.source == str(cached)


def test_hash_mismatch_is_refused_and_nothing_is_cached(tiny_weights, server, monkeypatch, capsys):
    path, entry, _ = tiny_weights
    www, url = server
    (www / "vgg_tiny").mkdir()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    (www / "vgg_tiny" / entry["fname"]).write_bytes(bytes(data))
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", url)
    code, _, err = cli(["summary", "vgg_tiny", "--weights", "imagenet"], capsys)
    last = _error_line(err)
    assert code == 1 and "is corrupt" in last and entry["hash"] in last
    assert not hub.cache_dir().exists() or not any(hub.cache_dir().iterdir())


def test_interrupted_download_leaves_nothing(tiny_weights, server, monkeypatch, capsys):
    path, entry, _ = tiny_weights
    www, url = server
    (www / "vgg_tiny").mkdir()
    (www / "vgg_tiny" / entry["fname"]).write_bytes(path.read_bytes())
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", url + "/cut")
    code, _, err = cli(["summary", "vgg_tiny", "--weights", "imagenet"], capsys)
    assert code == 1 and "cannot download" in _error_line(err)
    assert not hub.cache_dir().exists() or not any(hub.cache_dir().iterdir())


def test_offline_says_where_to_put_the_file(tiny_weights, monkeypatch, capsys):
    _, entry, _ = tiny_weights
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", "http://127.0.0.1:9")
    code, _, err = cli(["summary", "vgg_tiny", "--weights", "imagenet"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"put it at {hub.cache_dir() / entry['fname']}" in err and entry["hash"] in err


def test_a_damaged_cached_copy_is_fetched_again(tiny_weights, server, monkeypatch, capsys):
    path, entry, _ = tiny_weights
    www, url = server
    (www / "vgg_tiny").mkdir()
    (www / "vgg_tiny" / entry["fname"]).write_bytes(path.read_bytes())
    hub.cache_dir().mkdir(parents=True)
    (hub.cache_dir() / entry["fname"]).write_bytes(b"half a file")
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", url)
    code, _, err = cli(["summary", "vgg_tiny", "--weights", "imagenet"], capsys)
    assert code == 0 and "downloading it again" in err
    assert (hub.cache_dir() / entry["fname"]).read_bytes() == path.read_bytes()


def test_keras_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert hub.cache_dir() == tmp_path / "kh" / "models"
    monkeypatch.delenv("KERAS_HOME")
    assert hub.cache_dir() == hub.Path(os.path.expanduser("~")) / ".keras" / "models"


def test_notop_and_top_files_say_which_flag_to_use(tmp_path, capsys):
    from convlens.models.keras_io import save_h5_model
    from convlens.models.registry import load_model
    from convlens.models.vgg import vgg_config
    small = dict(blocks=(2, 2, 3, 3, 3), widths=(4, 8, 16, 32, 32), hidden=32, name="vgg_tiny")
    for top in (True, False):
        model, params = load_model("vgg_tiny", random_init=0, include_top=top,
                                   input_shape=None if top else (32, 32, 3))
        save_h5_model(model, params, tmp_path / f"top{top}.h5",
                      vgg_config(**small, include_top=top, input_shape=(32, 32, 3)))
    code, _, err = cli(["summary", "vgg_tiny", "--weights", str(tmp_path / "topFalse.h5")], capsys)
    assert code == 1 and "has no classifier (notop weights" in err and "add --no-top" in err
    code, _, err = cli(["summary", "vgg_tiny", "--no-top", "--weights", str(tmp_path / "topTrue.h5")], capsys)
    assert code == 1 and "holds a classifier (fc1, fc2, predictions)" in err and "drop --no-top" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "convnext_tiny", "densenet121", "vgg16"])
def test_the_table_is_what_keras_asks_for(name):
    """The file names, addresses and hashes are exactly those keras.applications passes to
    keras.utils.get_file (captured, nothing downloaded)."""
    keras = pytest.importorskip("keras")
    import sys
    sys.path.insert(0, str(hub.Path(__file__).resolve().parents[2] / "tools"))
    from make_zoo import weights_source
    fn = getattr(keras.applications, zoo.entries()[name]["keras_name"])
    for top in (True, False):
        got = weights_source(fn, top)
        assert got["subdir"] == "models"
        mine = zoo.weights(name, top)
        assert (mine["fname"], mine["url"], mine["hash"]) == (got["fname"], got["url"], got["hash"])


@pytest.mark.slow
def test_summary_resnet50_imagenet_from_the_cache_and_from_a_server(tmp_path, server, monkeypatch, capsys):
    """`convlens summary resnet50 --weights imagenet`: with the file in Keras's cache, and
    with an empty cache and a server standing in for Keras's host."""
    keras = pytest.importorskip("keras")
    from tests.keras_helpers import write_published
    www, url = server
    kmodel = keras.applications.ResNet50(weights=None)
    entry = zoo.weights("resnet50", True)
    made = www / "keras-applications" / entry["url"].split("keras-applications/")[1]
    made.parent.mkdir(parents=True)
    write_published(kmodel, made, nested=True)
    monkeypatch.setitem(zoo.entries()["resnet50"]["weights"]["top"], "hash", _md5(made))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", url + "/keras-applications/")
    code, out, err = cli(["summary", "resnet50", "--weights", "imagenet"], capsys)
    assert code == 0, err
    assert "Total params: 25,636,712" in out and (tmp_path / "kh" / "models" / entry["fname"]).exists()
    monkeypatch.setenv("CONVLENS_WEIGHTS_URL", "http://127.0.0.1:9/")  # now offline: the cache serves
    code, out, err = cli(["summary", "resnet50", "--weights", "imagenet"], capsys)
    assert code == 0 and "Total params: 25,636,712" in out, err
