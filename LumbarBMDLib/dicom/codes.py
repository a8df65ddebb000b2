"""Every coded concept the SEG and SR use, in one place (DICOM PS3.16 conventions).

Standard codes (SNOMED CT "SCT", DICOM "DCM", UCUM):

* segment categories (CID 7150): Anatomical Structure (SCT 91723000) for the vertebral bodies, Tissue
  (SCT 85756007) for the trabecular ROIs;
* segment types (CID 7151): L1 vertebra (SCT 66794005), L2 vertebra (SCT 14293000), L3 vertebra (SCT 36470004),
  L4 vertebra (SCT 11994002); the trabecular ROI is Bone (SCT 3138006, CID 7166 tissue) with the vertebra as its
  anatomic region; the patient's mean is reported on Lumbar spine (SCT 122496007);
* categories as qualitative evaluations: Osteoporosis (SCT 64859006), Osteopenia (SCT 312894000), Normal
  (SCT 17621005);
* unit mg/cm3 (UCUM ``mg/cm3``); the mean's derivation Mean (SCT 373098007); algorithm families Artificial
  Intelligence (DCM 123110) for the network's segmentation, Image Processing (DCM 110001) for the patch placement;
  report title Imaging Measurement Report (DCM 126000); procedure Computed tomography (SCT 77477000).

**Local codes** (coding scheme designator ``99LUMBARBMD``, private as PS3.16 allows with the "99" prefix), where no
standard code was verified for the concept: volumetric BMD (QCT-equivalent, K2HPO4 mg/cm³; LOINC and SNOMED codes
for bone density found are DXA areal or T/Z-scores, not this quantity), the category concept (ACR/ISCD spine QCT
thresholds), the segmentation and identification confidences, and the text items (calibration, contrast phase,
QC flag, level not measured, algorithm). Replace a local code here when a standard one is adopted: nothing else
names them.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

LOCAL_SCHEME = "99LUMBARBMD"


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, LOCAL_SCHEME, meaning)


ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
TISSUE = _sct("85756007", "Tissue")
BONE = _sct("3138006", "Bone")
LUMBAR_SPINE = _sct("122496007", "Lumbar spine")
VERTEBRA = {
    "L1": _sct("66794005", "L1 vertebra"),
    "L2": _sct("14293000", "L2 vertebra"),
    "L3": _sct("36470004", "L3 vertebra"),
    "L4": _sct("11994002", "L4 vertebra"),
}
CATEGORY_VALUE = {
    "osteoporosis": _sct("64859006", "Osteoporosis"),
    "osteopenia": _sct("312894000", "Osteopenia"),
    "normal": _sct("17621005", "Normal"),
}
MEAN = _sct("373098007", "Mean")
COMPUTED_TOMOGRAPHY = _sct("77477000", "Computed tomography")
ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")
IMAGE_PROCESSING = CodedConcept("110001", "DCM", "Image Processing")
MG_PER_CM3 = CodedConcept("mg/cm3", "UCUM", "milligram per cubic centimeter")
NO_UNITS = CodedConcept("1", "UCUM", "no units")

BMD = _local("VBMD", "Volumetric bone mineral density (QCT-equivalent, K2HPO4)")
BMD_CATEGORY = _local("BMDCAT", "BMD category (ACR/ISCD spine QCT)")
SEGMENTATION_CONFIDENCE = _local("SEGCONF", "Segmentation confidence (mean fused network probability)")
IDENTIFICATION_CONFIDENCE = _local("IDCONF", "Level identification confidence (anatomical numbering)")
CALIBRATION = _local("CALIB", "Calibration used")
CONTRAST_PHASE = _local("PHASE", "Contrast phase")
QC_FLAG = _local("QCFLAG", "Quality control flag")
LEVEL_NOT_MEASURED = _local("NOTMEAS", "Level not measured")
ALGORITHM = _local("ALGO", "Algorithm")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
