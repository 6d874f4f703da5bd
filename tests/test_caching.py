"""Prefect task cache keys: what makes a stage rerun (the flow-level behaviour is in test_flows.py)."""

from __future__ import annotations


def test_cache_key_covers_inputs_and_files_named_in_the_config(tmp_path):
    from pipelines.caching import stage_cache_key

    data = tmp_path / "data"
    (data / "frames").mkdir(parents=True)
    manifest = data / "frames" / "frames.parquet"
    manifest.write_bytes(b"v1")
    library = tmp_path / "library.csv"
    library.write_text("avatar_id,mode,source\na,image,a.png\n")
    config = {"preset": "demo", "library": str(library)}
    key = stage_cache_key("reconstruct", "1", config, str(data), [str(manifest)])
    assert key == stage_cache_key("reconstruct", "1", dict(config), str(data), [str(manifest)])  # deterministic
    assert key != stage_cache_key("reconstruct", "2", config, str(data), [str(manifest)])  # version
    assert key != stage_cache_key("reconstruct", "1", {**config, "preset": "tiny"}, str(data), [str(manifest)])
    library.write_text("avatar_id,mode,source\nb,image,b.png\n")  # the library's content, same path
    changed = stage_cache_key("reconstruct", "1", config, str(data), [str(manifest)])
    assert changed != key
    manifest.write_bytes(b"v2")  # an input's content
    assert stage_cache_key("reconstruct", "1", config, str(data), [str(manifest)]) != changed
