"""The ONNX Runtime backend: same scores as torch (<= 1e-5), a cached export, and a clean fallback to torch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from service.backend import CheckpointBackend  # noqa: E402  (after the skips: needs the onnx extra)

TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a good answer is helpful polite and on topic",
    "no",
    "red green blue yellow black white cat dog bird fish tree river mountain city " * 3,
]


def _copy(src: Path, tmp_path: Path) -> Path:
    """A private copy, so that the cached export of one test is not another's."""
    return Path(shutil.copytree(src, tmp_path / src.name))


def _random_biases(path: Path) -> Path:
    """Give every bias and norm of the checkpoint random values: initialised models have them at 0 and 1, which
    hides a graph that drops or misplaces one."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.endswith(("bias", "LayerNorm.weight", "norm.weight")):
            weights[name] = tensor + 0.5 * torch.randn(tensor.shape, generator=generator)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _batches(backend: CheckpointBackend) -> list[list[list[int]]]:
    ids = [backend.formatter.encode({"text": t}).input_ids for t in TEXTS]
    return [[i] for i in ids] + [ids, ids[::-1], ids[1:3]]


@pytest.mark.parametrize("model, graph", [("tiny_bert_dir", "bert-cls"), ("tiny_llama_dir", "decoder-kv")])
def test_onnx_scores_match_torch_in_every_batch(model, graph, request, tmp_path):
    """A BERT classifier gets the graph whose last layer runs only at [CLS]; a decoder the graph with past keys and
    values (prompt prefixes shared), others their own forward. Either way the scores are torch's, with every weight,
    bias and norm random."""
    path = _random_biases(_copy(request.getfixturevalue(model), tmp_path))
    torch_backend = CheckpointBackend.load(path, backend="torch")
    onnx_backend = CheckpointBackend.load(path, backend="onnx")
    assert onnx_backend.info.extra["backend"] == "onnx" and torch_backend.info.extra["backend"] == "torch"
    assert onnx_backend.info.extra["onnx_graph"] == graph
    for batch in _batches(torch_backend):  # padded next to longer and shorter neighbours, and alone
        assert onnx_backend.forward(batch) == pytest.approx(torch_backend.forward(batch), abs=1e-5)


def test_export_is_cached_next_to_the_checkpoint_and_reused(tiny_bert_dir, tmp_path, caplog):
    path = _copy(tiny_bert_dir, tmp_path)
    with caplog.at_level(logging.INFO, logger="reward.backend"):
        first = CheckpointBackend.load(path, backend="onnx")
    exported = Path(first.info.extra["onnx_path"])
    assert exported.parent == path / "onnx" and exported.is_file()
    assert sum("exported" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    stamp = exported.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="reward.backend"):
        second = CheckpointBackend.load(path, backend="onnx")
    assert second.info.extra["onnx_path"] == str(exported) and exported.stat().st_mtime_ns == stamp
    assert not any("exported" in r.getMessage() for r in caplog.records)
    assert list((path / "onnx").iterdir()) == [exported]  # no temporary file left behind


def test_new_weights_get_a_new_export(tiny_bert_dir, tmp_path):
    """The cache key follows the weights: a retrained checkpoint in the same folder is never served a stale graph."""
    from safetensors.torch import load_file, save_file

    path = _copy(tiny_bert_dir, tmp_path)
    before = CheckpointBackend.load(path, backend="onnx")
    weights = load_file(path / "model.safetensors")
    name = next(k for k in weights if k.endswith("classifier.weight") or k.endswith("score.weight"))
    weights[name] = weights[name] * 2
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    after = CheckpointBackend.load(path, backend="onnx")
    assert after.info.extra["onnx_path"] != before.info.extra["onnx_path"]
    batch = [after.formatter.encode({"text": TEXTS[1]}).input_ids]
    assert after.forward(batch) == pytest.approx(CheckpointBackend.load(path).forward(batch), abs=1e-5)


def test_unexportable_model_falls_back_to_torch_with_one_warning(tiny_bert_dir, tmp_path, caplog):
    path = _copy(tiny_bert_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="reward.backend"):
        backend = CheckpointBackend.load(path, backend="onnx", dtype="bfloat16")
    assert backend.info.extra["backend"] == "torch" and "float32" in backend.info.extra["fallback"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "scoring with torch instead" in warnings[0].getMessage()
    batch = [backend.formatter.encode({"text": TEXTS[0]}).input_ids]
    assert len(backend.forward(batch)) == 1


def test_auto_keeps_torch_quietly_where_onnx_does_not_apply(tiny_bert_dir, tmp_path, caplog):
    path = _copy(tiny_bert_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="reward.backend"):
        backend = CheckpointBackend.load(path, backend="auto", dtype="bfloat16")
    assert backend.info.extra == {"backend": "torch"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert CheckpointBackend.load(path, backend="auto").info.extra["backend"] == "onnx"


@pytest.mark.parametrize("model, fallback", [("tiny_bert_dir", "onnx"), ("tiny_llama_dir", "torch")])
def test_a_corrupt_cached_graph_falls_back_to_the_next_graph_then_torch(model, fallback, request, tmp_path, caplog):
    path = _copy(request.getfixturevalue(model), tmp_path)
    exported = Path(CheckpointBackend.load(path, backend="onnx").info.extra["onnx_path"])
    exported.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="reward.backend"):
        backend = CheckpointBackend.load(path, backend="onnx")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not load" in warnings[0]
    assert backend.info.extra["backend"] == fallback
    if fallback == "onnx":
        assert backend.info.extra["onnx_graph"] == "full"
    batch = [backend.formatter.encode({"text": TEXTS[1]}).input_ids]
    assert backend.forward(batch) == pytest.approx(CheckpointBackend.load(path).forward(batch), abs=1e-5)


def test_a_graph_whose_scores_differ_from_torch_is_not_used(tiny_bert_dir, tmp_path, monkeypatch, caplog):
    """The check against torch guards every graph: a wrong [CLS]-only graph is logged and the full one serves."""
    from service import graphs
    from service.graphs import bert

    def off_by_a_little(model, label_index):
        module = bert.build(model, label_index)
        forward = module.forward
        module.forward = lambda input_ids, attention_mask: forward(input_ids, attention_mask) + 1e-4
        return module

    monkeypatch.setattr(graphs, "FAST_GRAPHS", (graphs.Graph(bert.NAME, bert.applies, off_by_a_little),))
    path = _copy(tiny_bert_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="reward.backend"):
        backend = CheckpointBackend.load(path, backend="onnx")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bert-cls" in warnings[0] and "differ" in warnings[0]
    assert backend.info.extra["onnx_graph"] == "full"
    assert backend.info.extra["fast_graph_missing"].startswith("bert-cls: exported scores differ")


def test_a_renamed_transformers_internal_stops_the_fast_graph_by_name(tiny_bert_dir):
    """The [CLS]-only graph is written against transformers' BERT modules: one that is not where the graph looks
    for it is named in the error, before any export."""
    from service import graphs

    model = CheckpointBackend.load(tiny_bert_dir).checkpoint.model
    assert graphs.graphs_for(model) == ["bert-cls", "full"]
    block = model.bert.encoder.layer[-1].attention
    block.add_module("self_attention", block.self)  # as a release that renamed it would have it
    del block.self
    with pytest.raises(graphs.GraphMismatch, match=r"attention\.self\.query, and BertAttention has no 'self'"):
        graphs.build(model, 0, "bert-cls")


def test_read_only_checkpoint_exports_to_the_cache_folder(tiny_bert_dir, tmp_path, monkeypatch):
    from service import onnx_session

    path = _copy(tiny_bert_dir, tmp_path)
    monkeypatch.setenv("REWARD_ONNX_CACHE", str(tmp_path / "cache"))
    # A read-only folder, as a mounted volume is; chmod cannot make one for root, which writes anyway.
    monkeypatch.setattr(onnx_session, "_writable", lambda folder: False)
    backend = CheckpointBackend.load(path, backend="onnx")
    assert Path(backend.info.extra["onnx_path"]).parent == tmp_path / "cache" / path.name
    assert not (path / "onnx").exists()


@pytest.mark.parametrize(
    "backend, window, expected_window", [("onnx", None, 1), ("torch", None, 0), ("onnx", 8, 8), ("torch", 8, 8)]
)
def test_unpadded_backend_serves_first_come_first_served(backend, window, expected_window, tiny_bert_dir, tmp_path):
    """ONNX Runtime computes each text alone, so grouping by length saves nothing: by default a text then waits only
    for those that came before it. Padded torch batches keep grouping by length."""
    from tests.fixtures.servers import app_client, make_settings

    path = _copy(tiny_bert_dir, tmp_path)
    settings = make_settings(path, backend=backend, batch_window_items=window)
    with app_client(settings) as client:
        engine = client.app.state.runtime.engine
        assert engine.backend.pads_batches is (backend == "torch")
        assert engine.limits.window_items == expected_window
        items = [{"text": t} for t in TEXTS]
        scores = client.post("/score", json={"items": items}).json()["scores"]
    reference = CheckpointBackend.load(path, backend="torch")
    expected = [reference.forward([reference.formatter.encode(i).input_ids])[0] for i in items]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_without_an_onnx_cache_variable_a_read_only_checkpoint_exports_under_xdg_cache_home(tmp_path, monkeypatch):
    """The serving image mounts the model read-only and sets XDG_CACHE_HOME to a writable /tmp folder."""
    from service import onnx_session

    monkeypatch.delenv("REWARD_ONNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(onnx_session, "_writable", lambda folder: False)
    path = onnx_session.cache_path(tmp_path / "model", "key")
    assert path == tmp_path / "xdg" / "reward-service" / "onnx" / "model" / "key.onnx"


def test_reward_export_writes_the_graph_the_service_then_loads(tiny_bert_dir, tmp_path, capsys, caplog):
    """``reward-export`` (e.g. in a container build) leaves the checked graph where the service looks for it."""
    from service.export_cli import main

    path = _copy(tiny_bert_dir, tmp_path)
    assert main([str(path)]) == 0
    exported = Path(capsys.readouterr().out.strip())
    assert exported.is_file() and exported.parent == path / "onnx" and "bert-cls" in exported.name
    with caplog.at_level(logging.INFO, logger="reward.backend"):
        backend = CheckpointBackend.load(path, backend="onnx")
    assert backend.info.extra["onnx_path"] == str(exported)
    assert not any("exported" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("renamed", [False, True], ids=["as-is", "internal-renamed"])
def test_the_tiny_bert_is_served_with_its_fast_graph_or_says_so(renamed, tiny_bert_dir, tmp_path, monkeypatch, caplog):
    """By default a BERT classifier on a CPU is served with the [CLS]-only graph. When it cannot be (here: an
    internal the graph is written against is missing, as after a transformers rename), the log warns and /info and
    the ``reward_fast_graph_missing`` metric say so, naming the internal."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.graphs import bert
    from tests.fixtures.servers import app_client, make_settings

    if renamed:
        monkeypatch.setattr(bert, "LAYER_INTERNALS", (*bert.LAYER_INTERNALS, "attention.self.renamed"))
    path = _copy(tiny_bert_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="reward.backend"), app_client(make_settings(path)) as client:
        batching = client.get("/info").json()["batching"]
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    (missing,) = families["reward_fast_graph_missing"].samples
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if not renamed:
        assert (batching["forward"], batching["graph"], batching["fast_graph_missing"]) == ("onnx", "bert-cls", None)
        assert missing.value == 0 and not warnings
    else:
        assert (batching["forward"], batching["graph"]) == ("onnx", "full")
        assert batching["fast_graph_missing"].startswith("bert-cls: ")
        assert "attention.self.renamed" in batching["fast_graph_missing"]
        assert missing.value == 1
        assert len(warnings) == 1 and "bert-cls" in warnings[0] and "attention.self.renamed" in warnings[0]
