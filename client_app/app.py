"""ClientApp: thin handlers — parse, call a Flower-free task, pack the reply."""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app import tasks
from common import contract as C
from common.config import RunConfig, build_config

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, tasks.ClientData]:
    cfg = build_config(context.run_config)
    # A real SuperNode may point at its own image folder (node config data-path).
    data_path = context.node_config.get("data-path")
    if data_path:
        cfg = cfg.model_copy(update={"dataset": str(data_path)})
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return cfg, pid, tasks.client_data(cfg, pid, n)


def _seed(cfg: RunConfig, pid: int) -> int:
    return cfg.seed * 1000 + pid


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    cfg, pid, data = _setup(msg, context)
    content = C.pack_reply(
        tasks.data_meta(data, pid), {"num-examples": len(data.train_labels)}
    )
    return Message(content, reply_to=msg)


@app.train("embed")
def embed(msg: Message, context: Context) -> Message:
    """OSCAR: upload one conditioning vector per class (never images or features)."""
    cfg, pid, data = _setup(msg, context)
    t0 = time.perf_counter()
    r = tasks.embed_classes(cfg, data, seed=_seed(cfg, pid))
    arrays = {"mean": r.means, "class_ids": r.class_ids, "counts": r.counts}
    meta = tasks.data_meta(data, pid) | {
        "embedding": cfg.embedding,
        "text-encoder": cfg.text_encoder,
        "example-caption": r.captions[0] if r.captions else "",
    }
    metrics = {
        "num-examples": len(data.train_labels),
        "caption-s-per-image": r.caption_s_per_image,
        "client-s": time.perf_counter() - t0,
        "dp-epsilon": cfg.dp_epsilon,
        "dp-delta": cfg.dp_delta if cfg.dp_epsilon > 0 else 0.0,
        "dp-sigma": r.dp_sigma,
    }
    content = C.pack_reply(meta, metrics, {C.KEY_EMBEDDINGS: arrays}, half=True)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One-shot FedAvg: train the received initial classifier locally, upload weights."""
    cfg, pid, data = _setup(msg, context)
    t0 = time.perf_counter()
    init = C.from_array_record(msg.content.array_records[C.KEY_MODEL])
    model = tasks.train_local_model(cfg, data, init, _seed(cfg, pid))
    metrics = {
        "num-examples": len(data.train_labels),
        "client-s": time.perf_counter() - t0,
    }
    arrays = {C.KEY_MODEL: dict(model.state_dict())}
    content = C.pack_reply(tasks.data_meta(data, pid), metrics, arrays)
    return Message(content, reply_to=msg)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """No federation: train and evaluate locally; only metrics go up."""
    cfg, pid, data = _setup(msg, context)
    t0 = time.perf_counter()
    model = tasks.train_local_model(cfg, data, None, _seed(cfg, pid))
    acc = tasks.accuracy(model, data.test_images, data.test_labels)
    metrics = {
        "num-examples": len(data.train_labels),
        "num-test-examples": len(data.test_labels),
        "accuracy": acc,
        "client-s": time.perf_counter() - t0,
    }
    return Message(C.pack_reply(tasks.data_meta(data, pid), metrics), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the pushed global classifier on the held-out split."""
    cfg, pid, data = _setup(msg, context)
    state = C.from_array_record(msg.content.array_records[C.KEY_MODEL])
    conf = msg.content.config_records[C.KEY_CONFIG]
    acc = tasks.evaluate_state(
        cfg,
        data,
        state,
        str(conf["arch"]),
        int(conf["num-classes"]),  # type: ignore[arg-type]
    )
    metrics = {
        "num-examples": len(data.train_labels),
        "num-test-examples": len(data.test_labels),
        "accuracy": acc,
    }
    return Message(C.pack_reply(tasks.data_meta(data, pid), metrics), reply_to=msg)


@app.train("lora")
def train_lora(msg: Message, context: Context) -> Message:
    """Federated LoRA: fine-tune an adapter of the generator, upload it once (fp16)
    together with the per-class caption embeddings (for server-side sampling)."""
    cfg, pid, data = _setup(msg, context)
    t0 = time.perf_counter()
    r = tasks.train_client_lora(cfg, data, _seed(cfg, pid))
    arrays = {f"adapter/{k}": v for k, v in r.adapter.items()} | {
        "emb/mean": r.embed.means,
        "emb/class_ids": r.embed.class_ids,
        "emb/counts": r.embed.counts,
    }
    meta = tasks.data_meta(data, pid) | {
        "embedding": cfg.embedding,
        "base-model": r.base_fingerprint,
        "lora-rank": cfg.lora_rank,
        "lora-alpha": cfg.lora_alpha,
    }
    metrics = {
        "num-examples": len(data.train_labels),
        "lora-final-loss": float(sum(r.losses[-10:]) / max(1, len(r.losses[-10:]))),
        "lora-train-s": r.train_s,
        "client-s": time.perf_counter() - t0,
    }
    content = C.pack_reply(meta, metrics, {C.KEY_LORA: arrays}, half=True)
    return Message(content, reply_to=msg)


@app.evaluate("lora")
def evaluate_lora(msg: Message, context: Context) -> Message:
    """Evaluate the merged adapter (FID-proxy on own data) and the global classifier."""
    cfg, pid, data = _setup(msg, context)
    conf = msg.content.config_records[C.KEY_CONFIG]
    adapter = {
        k.removeprefix("adapter/"): v.float()
        for k, v in C.from_array_record(msg.content.array_records[C.KEY_LORA]).items()
    }
    gen_metrics = tasks.evaluate_lora(
        cfg, data, adapter, int(conf["lora-rank"]), float(conf["lora-alpha"]),  # type: ignore[arg-type]
        seed=_seed(cfg, pid), samples_per_class=cfg.lora_samples_per_class,
    )  # fmt: skip
    state = C.from_array_record(msg.content.array_records[C.KEY_MODEL])
    acc = tasks.evaluate_state(
        cfg, data, state, str(conf["arch"]), int(conf["num-classes"])
    )  # type: ignore[arg-type]
    metrics = {
        "num-examples": len(data.train_labels),
        "num-test-examples": len(data.test_labels),
        "accuracy": acc,
        **gen_metrics,
    }
    return Message(C.pack_reply(tasks.data_meta(data, pid), metrics), reply_to=msg)
