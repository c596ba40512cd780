"""Build a tiny fake run directory (docs/run-directory.md layout) for report/predict tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from consilia.common.config import ModelConfig, RunConfig, TaskSpec
from consilia.common.evaluation.metrics import compute_metrics
from consilia.common.model_files import save_model_file
from consilia.common.serde import model_from_run_config
from consilia.common.training.inference import predict_proba

SIZE = 16


def synthetic_images(n: int, num_classes: int, rng: np.random.Generator,
                     channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, 16, 16) images with a class-dependent bright square, and labels."""
    labels = rng.integers(0, num_classes, n)
    images = rng.normal(40, 10, (n, channels, SIZE, SIZE))
    for i, label in enumerate(labels):
        offset = 2 + 4 * int(label)
        images[i, :, offset:offset + 4, offset:offset + 4] += 150
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def tiny_run_config(class_names: list[str]) -> RunConfig:
    """A RunConfig for a 4-channel-wide CNN on 16 px grey images."""
    return RunConfig(
        name="fake-run",
        model=ModelConfig(name="cnn", kwargs={"width": 4}),
        task=TaskSpec(class_names=class_names, in_channels=1, image_size=SIZE),
    )


def train_briefly(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                  steps: int = 30, seed: int = 0) -> torch.nn.Module:
    """A few Adam steps so the model is better than chance (not converged on purpose)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(images).float() / 255.0
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return model.eval()


def make_run_dir(root: Path, class_names: list[str] | None = None, num_sites: int = 2,
                 dp: bool = True, seed: int = 0) -> Path:
    """Write a complete tiny run directory under ``root`` and return it."""
    class_names = class_names or ["alpha", "beta", "gamma"]
    num_classes = len(class_names)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    run = tiny_run_config(class_names)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(run.model_dump(mode="json")))
    (root / "task.json").write_text(run.task.model_dump_json(indent=2))
    (root / "environment.json").write_text(json.dumps({"python": "3.11", "seed": seed}))

    test_images, test_labels = synthetic_images(60, num_classes, rng)
    noisy = rng.choice(len(test_labels), size=8, replace=False)  # label noise: some errors
    test_labels[noisy] = (test_labels[noisy] + 1) % num_classes
    np.savez_compressed(root / "test_set.npz", images=test_images, labels=test_labels)

    sites = [f"site-{i:02d}" for i in range(num_sites)]
    partition_rows = []
    site_train = {}
    for site in sites:
        tr_x, tr_y = synthetic_images(80, num_classes, rng)
        va_x, va_y = synthetic_images(30, num_classes, rng)
        (root / "sites").mkdir(exist_ok=True)
        np.savez(root / "sites" / f"{site}.npz", train_images=tr_x, train_labels=tr_y,
                 val_images=va_x, val_labels=va_y, class_names=np.asarray(class_names))
        site_train[site] = (tr_x, tr_y)
        counts = {c: int((tr_y == k).sum()) for k, c in enumerate(class_names)}
        partition_rows.append({"site": site, "n_train": len(tr_y), "n_val": len(va_y),
                               **counts, "shift": "gamma 1.1"})
    header = list(partition_rows[0])
    lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in partition_rows]
    (root / "partition.csv").write_text("\n".join(lines) + "\n")

    pooled_x = np.concatenate([v[0] for v in site_train.values()])
    pooled_y = np.concatenate([v[1] for v in site_train.values()])
    models = {
        "federated": train_briefly(model_from_run_config(run), pooled_x, pooled_y, 25, seed),
        "centralized": train_briefly(model_from_run_config(run), pooled_x, pooled_y, 40, seed),
    }
    for i, site in enumerate(sites):
        models[f"local-{site}"] = train_briefly(model_from_run_config(run), *site_train[site],
                                                steps=10, seed=seed + i + 1)
    save_model_file(root / "global_model.safetensors", models["federated"], run, 3)
    save_model_file(root / "checkpoints" / "round-003.safetensors", models["federated"], run, 3)
    final: dict = {"local_only": {}}
    (root / "predictions").mkdir(exist_ok=True)
    for name, model in models.items():
        if name != "federated":
            save_model_file(root / "models" / f"{name}.safetensors", model, run, 0,
                            {"baseline": name})
        prob = predict_proba(model, test_images)
        np.savez_compressed(root / "predictions" / f"{name}.npz", y_true=test_labels,
                            y_prob=prob)
        metrics = compute_metrics(test_labels, prob, class_names).to_dict()
        if name.startswith("local-"):
            final["local_only"][name.removeprefix("local-")] = metrics
        else:
            final[name] = metrics
    final["local_only"]["mean"] = final["centralized"]
    (root / "final_metrics.json").write_text(json.dumps(final, indent=2))

    (root / "metrics").mkdir(exist_ok=True)
    records = [{"round": 0, "elapsed_s": 0.5,
                "server_eval": {"loss": 1.1, "accuracy": 0.34, "auc": 0.5}}]
    for r in range(1, 4):
        site_entries = {}
        for i, site in enumerate(sites):
            entry = {"train-loss": 1.0 / r, "num-examples": 80, "eval-loss": 1.1 / r,
                     "accuracy": 0.5 + 0.1 * r - 0.05 * i, "auc": 0.6 + 0.1 * r - 0.02 * i}
            if dp:
                entry["epsilon"] = 0.8 * r + 0.1 * i
            site_entries[site] = entry
        records.append({
            "round": r, "elapsed_s": 1.0 * r,
            "train": {"train-loss": 1.0 / r, "num-examples": 80 * num_sites},
            "sites": site_entries,
            "federated_eval": {"eval-loss": 1.1 / r, "accuracy": 0.5 + 0.1 * r,
                               "auc": 0.6 + 0.1 * r, "num-examples": 30 * num_sites},
            "server_eval": {"loss": 1.0 / r, "accuracy": 0.5 + 0.1 * r,
                            "balanced_accuracy": 0.5 + 0.1 * r, "auc": 0.6 + 0.1 * r,
                            "f1": 0.5, "sensitivity": 0.5, "specificity": 0.7},
        })
    (root / "metrics" / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root
