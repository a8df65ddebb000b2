"""Phantomless (internal) calibration and contrast phase (issue 15).

Opportunistic CT has no calibration phantom in the scan. The tissues every abdominal CT contains (air, subcutaneous
and visceral fat, paraspinal muscle, blood in the aorta/IVC) have known elemental compositions, so their HU fix the
scanner's response (its effective energy and water/air calibration), from which the HU of K2HPO4 mineral follows
(Michalski et al. 2020; Bonelab's Ogo). The modules, by role:

* ``tissues``: the reference tissues found in the CT (ROIs, HU statistics, QC);
* ``phase``: the contrast phase from the aorta, portal vein and IVC, and the published trabecular correction;
* ``fit``: the scanner response fitted to the tissues' HU (``LumbarBMDLib.phantom.physics``), mapping trabecular HU
  to K2HPO4-equivalent mineral, and the choice between a phantom scan, this fit and the nominal line;
* ``assess``: all of it for one case, and the calibration and contrast correction the pipeline applies to the HU
  before the patches.
"""
