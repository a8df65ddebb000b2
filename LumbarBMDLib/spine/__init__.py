"""Finding and naming the vertebrae on the CT itself (DESIGN.md "Method" 4: level identity from anatomy).

The network of the paper numbers vertebrae from what its training images taught it, and on real CTs it confuses
neighbours (the paper's limitation 3). This package identifies the levels with classical image analysis instead:

* :mod:`~LumbarBMDLib.spine.frame`: a curved frame along the spinal canal (arc length, left–right, front–back), and
  the CT resampled on planes perpendicular to the canal ("straightened"), so that endplates and discs lie across
  the frame whatever the lordosis, kyphosis, scoliosis or the volume's obliquity.
* :mod:`~LumbarBMDLib.spine.chain`: the vertebral-body chain in front of the canal: the discs (dark bands between
  two endplates) and the bodies between them, each with its extent and centre (LPS).
* :mod:`~LumbarBMDLib.spine.anchors`: the anatomical anchors, detected and not assumed: rib-bearing vertebrae (ribs
  reaching from the costovertebral region far beyond any transverse process) and the sacrum (S1: the first segment
  joined to the alae, with the iliac bones beside it).
* :mod:`~LumbarBMDLib.spine.numbering`: the chain numbered by counting from the anchors, with the checks that refuse
  an anatomy that contradicts itself and the flags for transitional anatomy.
* :mod:`~LumbarBMDLib.spine.labelling`: the network's segments renumbered by the chain body they lie on.

:func:`identify_spine` runs the first four on a CT whose canal was found.
"""

from __future__ import annotations

from LumbarBMDLib.spine.numbering import SpineIdentification, identify_spine

__all__ = ["SpineIdentification", "identify_spine"]
