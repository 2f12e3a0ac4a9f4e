"""What textual-inversion training puts in place of captions (TRAINERS §3.3): `--use_object_template` and
`--use_style_template` lists in the classic textual-inversion form ("a photo of a {}"; our own wording, kohya's
counts: 27 object and 19 style strings, two of the style strings twice), and the caption rule of a run.

`{}` is filled with the token's words `T T1 ... T{n-1}`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from library.text.textual_inversion import expand_tokens

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


@dataclass(frozen=True)
class TokenCaptions:
    """The caption rule of a TI run, applied to every processed caption (after shuffle/keep-tokens, not to a
    dropped one): a random template per image load, or the caption with each whole-word `T` expanded to
    `T T1 ... T{n-1}`. Frozen and plain, so data-loader workers can pickle it."""

    token: str
    token_words: str  # "T T1 ... T{n-1}"
    templates: tuple[str, ...] = ()

    def __call__(self, caption: str, rng: random.Random) -> str:
        if self.templates:
            return rng.choice(self.templates).format(self.token_words)
        if self.token_words == self.token:
            return caption
        return expand_tokens(caption, {self.token: self.token_words})
