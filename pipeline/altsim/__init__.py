"""altsim: an independently designed synthetic bone-radiograph simulator for training fracture detectors.

Independence. This package was written without reading, importing or looking at the output of the project's
other simulators: not ``pipeline/synth/`` (the existing generator), ``bench/othersim.py``, their tests, ``docs/``,
``bench/results/``, ``var/`` or any model under ``pipeline/models/``, and no model was run. The only project
files consulted were ``pipeline/training/datasets.py`` (to match the on-disk layout its importer reads),
``pipeline/taxonomy.py`` and ``shared/fracture-taxonomy.md`` (the eleven fracture types and their definitions),
``shared/STYLE.md`` and ``pyproject.toml``. Every modelling choice comes from general knowledge of radiography
and radiological anatomy. Keep it that way when changing this package: its value is that it is a *second*,
unrelated idea of what a radiograph looks like.

What it models (see the modules):

* :mod:`~pipeline.altsim.anatomy` - six regions (forearm/elbow/wrist, leg/knee/ankle, humerus/shoulder/elbow,
  femur/hip/knee, hand, foot); adults and children (open physes with a zone of provisional calcification,
  carpal bones not yet ossified); AP, lateral and oblique projections (paired bones separate or superimpose);
  bones as projected elliptical tubes with cortex, medulla, flared metaphyses and rounded articular ends.
  Intact mimics of fracture, independent of the label: nutrient canals, growth plates, overlapping bones,
  joint lines, sesamoid/accessory ossicles, benign lucent lesions and bone islands, skin folds, arterial
  calcification, dislocation without fracture.
* :mod:`~pipeline.altsim.fractures` - the eleven taxonomy types as rigid fragments (gaps, overlaps, cortical
  steps) and lucent cracks, from hairline (1-2 px, low contrast) to grossly displaced.
* :mod:`~pipeline.altsim.render` - attenuation line integrals, casts and splints, plates/nails/wires, lead
  markers; heel effect, scatter, focal/detector blur, quantum noise; logarithmic processing, windowing,
  gamma/film curve, unsharp masking, collimation (raw or digital shutter), burned-in text; 8/16-bit output.
* :mod:`~pipeline.altsim.dataset` - writes ``labels.csv``/``images``/``masks``/``altsim.json``;
  :mod:`~pipeline.altsim.cli` - the ``altsim`` click command (``python -m pipeline.altsim``).

Every sample's random stream is ``numpy.random.default_rng([seed, index])``, so a dataset is identical whatever
the number of workers.
"""

from pipeline.altsim.dataset import VERSION, generate
from pipeline.altsim.render import render

__all__ = ["VERSION", "generate", "render"]
