"""The public API: every name means one thing and works more than once."""

import pkgutil

import numpy as np

import featcache
from conftest import make_npz


def test_no_public_name_is_also_a_submodule():
    submodules = {m.name for m in pkgutil.iter_modules(featcache.__path__)}
    assert not submodules & set(featcache.__all__), submodules & set(featcache.__all__)


def test_every_public_name_resolves_to_the_same_object_twice():
    for name in featcache.__all__:
        first = getattr(featcache, name)
        # importing every submodule must not replace a public function on the package
        for module in pkgutil.iter_modules(featcache.__path__):
            if module.name == "__main__":
                continue
            __import__(f"featcache.{module.name}")
        assert getattr(featcache, name) is first, name


def test_extract_and_train_head_called_twice(tmp_path):
    data = make_npz(tmp_path / "d.npz", n_train=60, n_test=6)
    settings = featcache.FeatureSettings(backbone="resnet50", weights="none", data=str(data), size=32,
                                         cache_dir=str(tmp_path / "cache"))
    options = featcache.ExtractOptions(progress=False)
    first = featcache.extract(settings, options, log=lambda _: None)
    second = featcache.extract(settings, options, log=lambda _: None)
    assert first == second and all(p.exists() for p in first)
    config = featcache.HeadConfig(kind="linear", epochs=2)
    runs = [featcache.train_head(settings, config) for _ in range(2)]
    assert runs[0].run_id != runs[1].run_id
    assert np.isfinite(runs[1].val_acc)
    assert featcache.list_backbones() == featcache.list_backbones()
    assert featcache.get_spec("resnet50") is featcache.get_spec("resnet50")
