"""Identities of the held-out generator: body shape, clothing from a street-clothing prior
(colours, textures, garments), hair, hats, bags, umbrellas, scarves; a few popular garments
are worn by several identities, so identities look alike in part."""

from __future__ import annotations

from typing import Any

import numpy as np

from heldout.draw import hsv

__all__ = ["TEXTURES", "clothing_hsv", "identity", "new_garment", "popular_garments", "worn"]


def clothing_hsv(rng: np.random.Generator, role: str) -> list[float]:
    """A clothing colour from a street-clothing prior: mostly neutral, denim and earth tones."""
    neutral, denim, earth = {"top": (0.35, 0.10, 0.12), "bottom": (0.45, 0.30, 0.12),
                             "jacket": (0.50, 0.12, 0.18)}[role]
    r = rng.random()
    if r < neutral:  # black / grey / white, black most often
        return [rng.random(), rng.uniform(0, 0.1), float(np.clip(rng.beta(1.2, 2.0) * 1.05, 0.06, 0.97))]
    if r < neutral + denim:
        return [rng.uniform(0.57, 0.66), rng.uniform(0.3, 0.75), rng.uniform(0.18, 0.6)]
    if r < neutral + denim + earth:  # khaki, brown, olive
        return [rng.uniform(0.05, 0.2), rng.uniform(0.25, 0.65), rng.uniform(0.25, 0.75)]
    return [rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.35, 0.97)]


TEXTURES = {
    "top": (("solid", "plaid", "dots", "gradient", "breton", "diagonal", "block", "print"),
            (0.42, 0.1, 0.07, 0.09, 0.1, 0.05, 0.1, 0.07)),
    "bottom": (("solid", "denim", "plaid", "sidestripe"), (0.55, 0.3, 0.05, 0.1)),
    "jacket": (("solid", "plaid", "block", "gradient"), (0.75, 0.08, 0.1, 0.07)),
}


def new_garment(rng: np.random.Generator, role: str) -> dict[str, Any]:
    hsv = clothing_hsv(rng, role)
    if rng.random() < 0.5:  # contrasting second colour
        hsv2 = clothing_hsv(rng, "top")
    else:  # tonal: same hue, lighter or darker
        hsv2 = [hsv[0] + rng.normal(0, 0.03), hsv[1] * rng.uniform(0.5, 1.2),
                hsv[2] + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4)]
    names, probs = TEXTURES[role]
    return {"hsv": hsv, "hsv2": hsv2, "texture": str(rng.choice(names, p=probs)),
            "freq": float(rng.uniform(2.0, 5.0)), "phase": float(rng.random()),
            "split": float(rng.uniform(0.35, 0.65))}


def worn(rng: np.random.Generator, garment: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (popular) garment with small colour differences, plus its RGB colours."""
    g = dict(garment)
    jit = lambda c: [c[0] + rng.normal(0, 0.008), c[1] * (1 + rng.normal(0, 0.05)), c[2] + rng.normal(0, 0.025)]
    g["rgb"], g["rgb2"] = hsv(*jit(g["hsv"])), hsv(*jit(g["hsv2"]))
    return g


def popular_garments(rng: np.random.Generator, n_people: int) -> dict[str, list[dict[str, Any]]]:
    return {role: [new_garment(rng, role) for _ in range(max(2, n_people // k))]
            for role, k in (("top", 8), ("bottom", 6), ("jacket", 6))}


def identity(rng: np.random.Generator, popular: dict[str, list[dict[str, Any]]] | None) -> dict[str, Any]:
    def pick(role: str, p_popular: float) -> dict[str, Any]:
        if popular and rng.random() < p_popular:
            return worn(rng, popular[role][int(rng.integers(len(popular[role])))])
        return worn(rng, new_garment(rng, role))

    lower = str(rng.choice(["trousers", "shorts", "skirt", "dress"], p=[0.62, 0.12, 0.16, 0.1]))
    top = pick("top", 0.28)
    skin = hsv(rng.uniform(0.03, 0.1), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.97))
    r = rng.random()
    hair_hsv = ([rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.7), rng.uniform(0.03, 0.25)] if r < 0.6 else
                [rng.uniform(0.06, 0.12), rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.5)] if r < 0.8 else
                [rng.uniform(0.1, 0.14), rng.uniform(0.35, 0.6), rng.uniform(0.6, 0.88)] if r < 0.9 else
                [0.0, rng.uniform(0, 0.08), rng.uniform(0.5, 0.85)] if r < 0.96 else
                [rng.random(), rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.9)])
    bag = str(rng.choice(["none", "backpack", "shoulder", "handbag"], p=[0.45, 0.28, 0.17, 0.1]))
    return {
        "girth": rng.uniform(0.82, 1.3), "shoulders": rng.uniform(0.9, 1.15), "hips": rng.uniform(0.9, 1.2),
        "head": rng.uniform(0.9, 1.12), "stride": rng.uniform(0.6, 1.2), "swing": rng.uniform(0.3, 1.0),
        "height": rng.uniform(0.9, 1.0),
        "skin": skin, "hair": hsv(*hair_hsv),
        "hairstyle": str(rng.choice(["short", "long", "bun", "bald", "curly"], p=[0.45, 0.25, 0.1, 0.08, 0.12])),
        "top": top, "sleeve": float(rng.choice([1.0, 0.45, 0.0], p=[0.45, 0.45, 0.1])),
        "jacket": pick("jacket", 0.3) if rng.random() < 0.3 else None, "jacket_open": bool(rng.random() < 0.6),
        "lower": lower, "bottom": top if lower == "dress" else pick("bottom", 0.4),
        "hem": rng.uniform(0.62, 0.8),  # skirt / dress length as body height fraction
        "tights": hsv(0, 0, rng.uniform(0.05, 0.2)) if rng.random() < 0.3 else None,
        "shoes": hsv(*clothing_hsv(rng, "bottom")) * np.float32(0.8),
        "hat": str(rng.choice(["none", "cap", "beanie"], p=[0.85, 0.08, 0.07])),
        "hat_rgb": hsv(*clothing_hsv(rng, "top")),
        "bag": bag, "bag_rgb": hsv(*clothing_hsv(rng, "jacket")),
        "umbrella": bool(rng.random() < 0.06), "umbrella_rgb": hsv(*clothing_hsv(rng, "top")),
        "scarf": hsv(*clothing_hsv(rng, "top")) if rng.random() < 0.1 else None,
    }
