"""What the LLM gets from the vision side of a shapes-VQA model: how much of the visual tokens' variance
each attribute explains, and how well a linear probe reads it.

Why: a tiny LLaVA trained from scratch either learns shape questions or stays at chance. A probe reads
shape from the visual tokens either way; what differs is the share of variance shape gets (the
direction the LLM must learn to use). Compare a checkpoint with the same model at initialisation (run
from the directory the model was trained in: the saved config's paths are relative to it):

    python bench/visual_tokens.py --run runs/tiny                 # runs/tiny/config.yaml + checkpoints/last.ckpt
    python bench/visual_tokens.py --run runs/tiny --at_init       # the same architecture, untrained
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from adaptive_mllm.data.shapes import COLOURS, GRID, SHAPES, draw_scene, generate_examples
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.recipe import parse_recipe

# keys a saved `fit` config holds that a model-only parse does not accept
_RUN_ONLY_KEYS = ("ckpt_path", "weights_only", "optimizer", "lr_scheduler", "verbose", "test_after_fit")


def load_model(run: Path, at_init: bool) -> AdaptiveMLLM:
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in _RUN_ONLY_KEYS:
        config.pop(key, None)
    config["trainer"] = {"logger": False, "callbacks": [], "accelerator": "cpu"}
    parsed = run / "visual_tokens_config.yaml"
    parsed.write_text(yaml.safe_dump(config))
    try:
        model = parse_recipe(["--config", str(parsed)]).model
    finally:
        parsed.unlink()
    model.configure_model()
    if not at_init:
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def visual_tokens(model: AdaptiveMLLM, num_scenes: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[N, H] projected tokens of the occupied cells of ``num_scenes`` fresh scenes, and their labels."""
    backbone = model.backbone
    examples = generate_examples(num_scenes, seed=seed, split="test", question_kinds=["count"])
    tokens, labels = [], {"shape": [], "colour": []}
    for start in range(0, len(examples), 100):
        chunk = examples[start : start + 100]
        pixels = torch.stack([backbone.preprocess_image(draw_scene(example.shapes)) for example in chunk])
        projected = backbone.project(backbone.encode_images(pixels).features)  # [B, GRID * GRID, H]
        for row, example in enumerate(chunk):
            for placed in example.shapes:
                tokens.append(projected[row, placed.row * GRID + placed.col])
                labels["shape"].append(SHAPES.index(placed.shape))
                labels["colour"].append(list(COLOURS).index(placed.colour))
    return torch.stack(tokens).float(), {name: torch.tensor(values) for name, values in labels.items()}


def explained_variance(tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class sum of squares over the total: the share of variance the attribute accounts for."""
    centred = tokens - tokens.mean(0)
    between = sum(int((labels == c).sum()) * centred[labels == c].mean(0).square().sum() for c in labels.unique())
    return float(between / centred.square().sum())


def probe_accuracy(tokens: torch.Tensor, labels: torch.Tensor, train_share: float = 0.7) -> float:
    """Held-out accuracy of an L2-regularised linear softmax probe on standardised tokens."""
    features = (tokens - tokens.mean(0)) / (tokens.std(0) + 1e-6)
    split = int(train_share * len(features))
    weight = torch.zeros(features.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = features[:split] @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, labels[:split]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    predictions = (features[split:] @ weight + bias).argmax(-1)
    return float((predictions == labels[split:]).float().mean())


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a run directory: config.yaml, checkpoints/last.ckpt")
    parser.add_argument("--at_init", action="store_true", help="the run's architecture with fresh weights")
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=5, help="scenes from a stream no split uses")
    args = parser.parse_args(argv)
    tokens, labels = visual_tokens(load_model(args.run, args.at_init), args.scenes, args.seed)
    result = {
        name: {"variance explained": explained_variance(tokens, y), "probe accuracy": probe_accuracy(tokens, y)}
        for name, y in labels.items()
    }
    print(f"{args.run}{' at initialisation' if args.at_init else ''}: {len(tokens)} occupied cells")
    for name, scores in result.items():
        print(f"  {name:7s} explains {scores['variance explained']:.3f} of the visual tokens' variance; "
              f"linear probe {scores['probe accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
