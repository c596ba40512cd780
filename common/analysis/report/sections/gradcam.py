"""Report section: a Grad-CAM gallery of the global model's correct and incorrect test cases."""

from __future__ import annotations

import numpy as np
import torch

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import embed_picture, esc, note
from consilia.common.analysis.report.run_files import RunFiles
from consilia.common.evaluation.explain import Explainer, overlay_image
from consilia.common.training.inference import eval_transform_for, predict_proba

__all__ = ["section_gradcam"]


def section_gradcam(run: RunFiles, ctx: ReportContext) -> str:
    """Show Grad-CAM maps of correct and most confident incorrect test cases."""
    test_set = run.test_set()
    images, labels = test_set.images, test_set.labels
    model, model_run, _ = run.global_model()
    names = run.class_names()
    transform = eval_transform_for(model_run)
    prob = predict_proba(model, images, batch_size=ctx.batch_size, transform=transform)
    pred = prob.argmax(axis=1)
    conf = prob.max(axis=1)
    rng = np.random.default_rng(ctx.seed)
    k = ctx.gallery
    correct = np.flatnonzero(pred == labels)
    wrong = np.flatnonzero(pred != labels)
    picks = {
        "correct": rng.choice(correct, size=min(k, len(correct)), replace=False)
        if len(correct) else np.array([], dtype=int),
        "incorrect": wrong[np.argsort(-conf[wrong])][:k],  # most confident mistakes first
    }
    explainer = Explainer(model)
    out = note(f"Global model on the test split: {len(correct)} correct, {len(wrong)} "
                f"incorrect. Map: {explainer.method} (target layer "
                f"{explainer.target_layer or 'n/a'}) for the predicted class; red = evidence.")
    for title, indices in picks.items():
        out += f"<h3>{esc(title)} predictions</h3>"
        if not len(indices):
            out += f'<p class="na">no {title} predictions</p>'
            continue
        figures = []
        for i in indices:
            raw = _as_float(images[i])
            x = transform(raw) if transform is not None else raw
            heat = explainer(x, int(pred[i]))
            display = _resize_like(raw, heat.shape)
            caption = (f"true {names[labels[i]]}, predicted {names[pred[i]]} "
                       f"(p={conf[i]:.2f}); case {i}")
            figures.append(
                "<figure>" + embed_picture(overlay_image(display, heat), caption)
                + f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
        out += '<div class="gallery">' + "".join(figures) + "</div>"
    return out


def _as_float(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> float tensor in [0, 1] (the model's raw input scale)."""
    return torch.from_numpy(np.ascontiguousarray(image)).float() / 255.0


def _resize_like(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(raw.shape[-2:]) == tuple(shape):
        return raw
    return torch.nn.functional.interpolate(raw[None], size=tuple(shape), mode="bilinear",
                                           antialias=True, align_corners=False)[0]
