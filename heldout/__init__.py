"""Held-out person re-ID test sets: a second, independent synthetic generator, test data for the
benchmarks and the tests (not part of the method).

The project's own generator (`purireid.data.synthetic`) is what the pipeline was tuned on;
this one exists so that learning claims can be checked on data nobody tuned for. It shares no
code or image model with it, only the output format (the Market-1501 layout and naming):

- people: an articulated 3-D stick-and-volume body (tapered capsules for limbs, a profiled
  torso, an ellipsoid head) posed by a walking phase and a heading, projected orthographically,
  so the silhouette changes with gait and viewpoint; parts are drawn far to near with soft,
  anti-aliased edges and cylinder shading. Face, hair and hat follow the head's 3-D facing.
- identities: continuous shape (girth, shoulders, hips, head, stride, arm swing), HSV clothing
  colours from a clothing prior (many blacks, greys, denims), textures (plaid, dots, gradient,
  stripes, colour blocks, chest print, denim grain), open or closed jackets, sleeve lengths,
  trousers / shorts / skirts / dresses, hair styles, hats, backpacks, shoulder bags, handbags,
  umbrellas, scarves. A few "popular garments" are worn by several identities, so identities
  look alike in part.
- cameras: each has its own scene (street facade, park, indoor hall, plaza) rendered once and
  cropped per image, a walking direction (so a viewpoint mix), person scale and aspect, and a
  colour response: 3x3 colour mixing, white balance, exposure, gamma, contrast, flare, and an
  illumination gradient with vignetting; plus resolution, blur, motion blur, noise and JPEG
  quality. `camera_strength` scales the colour response, illumination and scene colours away
  from a neutral camera (0: identical colour response and grey scenes).
- images come in tracks (a person crossing a camera: a few frames with advancing gait phase),
  with detection jitter, truncated boxes, occluders (passers-by, cars, poles, bushes, signs),
  distractors (pid 0) and junk crops (pid -1) in the gallery.

Deterministic for a seed: every image has its own RNG keyed by (seed, role, pid, index).
Modules by concern: `draw` (keyed random streams, soft shapes, textures), `identity`, `body`
(the posed person), `scene` (camera backgrounds), `camera` (colour response, optics, one crop),
`layout` (splits, tracks, file names, the folder), `cli`. The sets are read with
`dataset: folder` (prepare.folder_name: the set's folder under data_root).

    python -m heldout OUT_DIR --train-ids 60 --test-ids 60 --images-per-id 10 --cameras 6 \\
        --camera-strength 1.0 --seed 0 [--preview sheet.png]
"""

from heldout.cli import contact_sheet
from heldout.layout import FOLDERS, GENERATOR, SUMMARY_NAME, VERSION, generate_heldout

__all__ = ["FOLDERS", "GENERATOR", "SUMMARY_NAME", "VERSION", "contact_sheet", "generate_heldout"]
