"""Numbering the vertebral-body chain by counting from the anchors (DESIGN.md "Method" 4).

* **T12** is the last rib-bearing vertebra, provided a vertebra without ribs is seen below it (fully in the field of
  view, with the band beside it inside the scan): then L1 is the first vertebra below T12, L2 the next, and so on.
* **S1** is the first sacral segment (:mod:`~LumbarBMDLib.spine.anchors`): L5 is the vertebra above it, L4 the next.
* **Both seen**: the vertebrae between them are counted. Five is the usual anatomy. Any other count (six lumbar-type
  vertebrae, a sacralised L5) is *transitional anatomy*: it is flagged and the levels are numbered from the
  thoracolumbar junction (L1 = the first vertebra without ribs), the convention of opportunistic CT densitometry,
  never decided silently.
* **Neither seen**: no level gets a number, and the sentence says why (no lumbar vertebra in view when the lowest
  vertebra still bears ribs; otherwise, no anchor to count from).
* **Contradictions** are refused with a sentence naming them: the sacrum above rib-bearing vertebrae, vertebrae
  with discs below the sacrum, or a rib-bearing vertebra below larger vertebrae without ribs (each, in practice, a
  head/foot flip of the image), and a count between the anchors that no spine has.

A level whose body the scan cuts so that less than ``MIN_VISIBLE_FRACTION`` of its expected height is in view is
identified but not measured ("only partly in the field of view"); a level beyond the chain's ends is "not in the
field of view", with the level where the scan ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from LumbarBMDLib.canal import CanalResult
from LumbarBMDLib.spine.anchors import Anchors, find_anchors
from LumbarBMDLib.spine.chain import VertebralChain, find_chain
from LumbarBMDLib.volume import CTVolume

LEVEL_NAMES = ("L1", "L2", "L3", "L4")
EXPECTED_LUMBAR = 5
PLAUSIBLE_LUMBAR = (3, 7)  # counts between the anchors outside this range are a contradiction, not a variant
MIN_VISIBLE_FRACTION = 0.7  # a body cut by the scan is measured only when this much of its expected height is in view
CUT_BODY_MIN_MM = 12.0  # a cut piece shorter than this is not numbered at all
MERGED_HEIGHT_RATIO = 1.6  # a zone this much taller than its neighbours' may hold two vertebrae (a disc not seen)
FLIP_MIN_WIDER_MM = 3.0  # rib-free vertebrae above a rib-bearing one, wider by this: the spine is upside down
LARGE_BODY_MM = 35.0  # vertebrae below the sacrum at least this wide are lumbar-type, not coccygeal
ISOLATED_RIB_GAP = 3  # rib-free vertebrae between two rib-bearing ones beyond which the lower one is not trusted
FAINT_FACTOR = 0.75  # a counted disc this faint (confidence factor 0.5 + strength / 2) is flagged
CONFIDENCE = {"T12 and sacrum": 0.97, "T12": 0.85, "sacrum": 0.85, "transitional": 0.6}


@dataclass
class QCFlag:
    """A quality-control flag: a code for programs and a sentence for the radiologist."""

    code: str
    message: str

    def as_json(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass
class LevelIdentity:
    """How one level L1–L4 was identified.

    Attributes:
        level: "L1".."L4".
        body: index of its chain body (None when it is not in the field of view or nothing is numbered).
        identified: whether the level is known on the CT.
        measurable: identified and enough of it in view to measure.
        anchor: what the count started from: "T12", "sacrum" or "T12 and sacrum".
        count: vertebrae counted from the anchor (L1 is 1 below T12; L4 is 2 above S1).
        confidence: of the identification, in (0, 1].
        reason: why it is not identified or not measurable ("" otherwise).
    """

    level: str
    body: int | None
    identified: bool
    measurable: bool
    anchor: str | None = None
    count: int | None = None
    confidence: float = 0.0
    reason: str = ""

    def as_json(self) -> dict:
        return {"anchor": self.anchor, "count": self.count, "confidence": round(float(self.confidence), 3),
                "chain_body": self.body}


@dataclass
class SpineIdentification:
    """The chain, the anchors and the numbering of one CT.

    Attributes:
        chain / anchors: what was found on the CT.
        names: per chain body its name ("T11", "T12", "L1", …, "S1") or None when the chain is not numbered.
        anchor: "T12", "sacrum", "T12 and sacrum" or None.
        lumbar_count: vertebrae between T12 and S1 when both are seen.
        t12_body / s1_body: chain indices of the anchors that were seen.
        levels: L1..L4.
        flags: QC flags (transitional anatomy, uncertain identification, …).
        refusal: the sentence saying why no level is numbered (None when numbered).
        contradiction: whether the refusal is a contradiction of the anatomy.
    """

    chain: VertebralChain
    anchors: Anchors
    names: list[str | None]
    anchor: str | None
    lumbar_count: int | None
    t12_body: int | None
    s1_body: int | None
    levels: list[LevelIdentity]
    flags: list[QCFlag] = field(default_factory=list)
    refusal: str | None = None
    contradiction: bool = False
    timings_s: dict = field(default_factory=dict)

    @property
    def numbered(self) -> bool:
        """Whether the chain carries level numbers."""
        return self.refusal is None

    def level(self, name: str) -> LevelIdentity:
        return next(lv for lv in self.levels if lv.level == name)

    def lumbar_z_range(self) -> tuple[float, float] | None:
        """LPS z range (mm) of the identified L1–L4 bodies (None when none is identified)."""
        z = [self.chain.bodies[lv.body].centre_lps[2] for lv in self.levels if lv.identified and lv.body is not None]
        return (min(z) - 20.0, max(z) + 20.0) if z else None

    def as_json(self) -> dict:
        """The ``spine`` object of results.json."""
        bodies = []
        for i, b in enumerate(self.chain.bodies):
            bodies.append({
                "name": self.names[i],
                "centre_lps": [round(float(v), 2) for v in b.centre_lps],
                "height_mm": round(b.height_mm, 1),
                "cut_by_scan": "above" if b.cut_above else ("below" if b.cut_below else None),
                "ribs": sorted(self.anchors.rib_sides[i]),
                "sacral": i in self.anchors.sacrum.sacral_bodies,
            })
        sac = self.anchors.sacrum
        t12 = self.chain.bodies[self.t12_body] if self.t12_body is not None else None
        return {
            "numbered": self.numbered,
            "anchor": self.anchor,
            "lumbar_count": self.lumbar_count,
            "anchors": {
                "T12": {"seen": t12 is not None,
                        "centre_lps": [round(float(v), 2) for v in t12.centre_lps] if t12 is not None else None},
                "sacrum": {"seen": bool(sac.seen and self.s1_body is not None),
                           "S1_top_lps": [round(float(v), 2) for v in sac.top_lps] if sac.top_lps is not None
                           else None},
            },
            "ribs": [{"side": r.side, "origin_lps": [round(float(v), 2) for v in r.medial_lps],
                      "vertebra": self.names[r.body] if r.body is not None and self.names[r.body] else None}
                     for r in self.anchors.ribs if r.body is not None and self.anchors.rib_sides[r.body]],
            "chain": bodies,
            "refusal": self.refusal,
            "contradiction": self.contradiction,
        }


# ---------------------------------------------------------------------------------------------------------------
def _names_from_t12(n: int, t12: int, lumbar: int | None = None) -> list[str | None]:
    names: list[str | None] = []
    for i in range(n):
        k = i - t12
        if k <= 0:
            t = 12 + k
            names.append(f"T{t}" if t >= 1 else f"C{7 + t}" if 7 + t >= 1 else None)
        elif k <= (EXPECTED_LUMBAR if lumbar is None else lumbar):
            names.append(f"L{k}")
        elif lumbar is not None:
            names.append(f"S{k - lumbar}")
        else:  # without the sacrum in view, what follows L5 is not known (an L6, or S1)
            names.append(None)
    return names


def _names_from_s1(n: int, s1: int) -> list[str | None]:
    names: list[str | None] = []
    for i in range(n):
        k = s1 - i  # 1 = L5
        if k <= 0:
            names.append(f"S{1 - k}")
        elif k <= EXPECTED_LUMBAR:
            names.append(f"L{EXPECTED_LUMBAR + 1 - k}")
        else:
            t = 12 - (k - EXPECTED_LUMBAR - 1)
            names.append(f"T{t}" if t >= 1 else None)
    return names


def _band_inside(chain: VertebralChain, anchors: Anchors, body: int) -> bool:
    """Whether the band beside the spine (where ribs would be) lies inside the scan over the body's zone."""
    b = chain.bodies[body]
    band = anchors.rib_band
    sel = (band.s_mm >= b.zone_top_s_mm) & (band.s_mm <= b.zone_bottom_s_mm)
    return bool(sel.any() and np.isfinite(band.values[sel]).mean() >= 0.9)


def _reference_height(chain: VertebralChain, i: int) -> float:
    """Expected height of body ``i`` (endplate to endplate): the median of the complete bodies nearest to it."""
    complete = [j for j, b in enumerate(chain.bodies) if b.complete]
    if not complete:
        return 25.0
    near = sorted(complete, key=lambda j: abs(j - i))[:3]
    return float(np.median([chain.bodies[j].height_mm for j in near]))


def _contradiction(chain: VertebralChain, anchors: Anchors, ribbed: list[int]) -> str | None:
    bodies = chain.bodies
    sac = anchors.sacrum
    if sac.seen and sac.body is not None:
        above = [i for i in ribbed if i > sac.body]
        if above:
            return ("the anatomy contradicts itself: the sacrum lies above rib-bearing vertebrae; the image is "
                    "probably flipped head to foot (check the scan's orientation)")
        last_sacral = max(sac.sacral_bodies)
        below = [i for i in range(last_sacral + 1, len(bodies))
                 if bodies[i].width_mm >= LARGE_BODY_MM and bodies[i].complete]
        if len(below) >= 2:
            return (f"the anatomy contradicts itself: {len(below)} vertebrae with discs lie below the sacrum; the "
                    "image is probably flipped head to foot (check the scan's orientation)")
    if ribbed:
        free_above = [i for i in range(min(ribbed)) if bodies[i].complete]
        if len(free_above) >= 2:
            wider = float(np.median([bodies[i].width_mm for i in free_above])
                          - np.median([bodies[j].width_mm for j in ribbed]))
            if wider >= FLIP_MIN_WIDER_MM:
                return ("the anatomy contradicts itself: the rib-bearing vertebrae lie below larger vertebrae without "
                        "ribs; the image is probably flipped head to foot (check the scan's orientation)")
    return None


def number_chain(chain: VertebralChain, anchors: Anchors) -> SpineIdentification:
    """Number the chain from its anchors (see the module docstring)."""
    n = len(chain.bodies)
    sac = anchors.sacrum
    s1 = sac.body if sac.seen else None
    # below the sacrum only bilateral ribs count (an image flipped head to foot); a one-sided "rib" there is pelvis
    ribbed_all = [i for i in range(n) if anchors.rib_bearing(i) and (s1 is None or i < s1
                                                                      or len(anchors.rib_sides[i]) == 2)]
    ribbed = [i for i in ribbed_all if s1 is None or i < s1]
    flags: list[QCFlag] = []
    # ribs run from T1 down to T12 without a gap in anatomy; a rib-bearing vertebra far below the others is bone
    # reaching as far as a rib (an implant's streaks, an osteophyte bridge to the iliac crest), not a rib
    ignored: list[tuple[int, int]] = []  # (body, rib-free vertebrae above it)
    while len(ribbed) >= 2 and ribbed[-1] - ribbed[-2] - 1 >= ISOLATED_RIB_GAP:
        ignored.append((ribbed[-1], ribbed[-1] - ribbed[-2] - 1))
        ribbed = ribbed[:-1]

    def refuse(sentence: str, contradiction: bool = False) -> SpineIdentification:
        levels = [LevelIdentity(name, None, False, False, reason=f"not identified: {sentence}") for name in LEVEL_NAMES]
        return SpineIdentification(chain, anchors, [None] * n, None, None, None, s1, levels, flags, sentence,
                                   contradiction)

    if n == 0:
        return refuse("no vertebral body was found in front of the spinal canal")
    contradiction = _contradiction(chain, anchors, ribbed_all)
    if contradiction:
        return refuse(contradiction, contradiction=True)
    # T12: the last rib-bearing vertebra, with a well-seen rib-free vertebra below it
    t12 = None
    if ribbed:
        last = max(ribbed)
        below = last + 1
        if below < n and (s1 is None or below <= s1) and chain.bodies[below].complete and (
                below == s1 or _band_inside(chain, anchors, below)):
            t12 = last
    s1_usable = s1 is not None and s1 > 0  # at the top of the scan no lumbar vertebra lies above it in view
    if t12 is None and not s1_usable:
        if ribbed and max(ribbed) == n - 1:
            return refuse("no lumbar vertebra in the field of view: the lowest vertebra in view still bears ribs "
                          "(a thoracic vertebra), so the scan ends above L1")
        if ribbed:
            return refuse("the levels cannot be numbered: below the last rib-bearing vertebra the scan does not show "
                          "a whole vertebra without ribs, and the sacrum is not in view; label the levels by hand")
        if s1 is not None:
            return refuse("no lumbar vertebra in the field of view: the scan starts at the sacrum")
        return refuse(f"the levels cannot be numbered: the scan shows neither the sacrum nor a rib-bearing vertebra "
                      f"(T12), so the {n} vertebrae in view cannot be told apart; label them by hand")
    lumbar_count = None
    if t12 is not None and s1_usable:
        lumbar_count = s1 - t12 - 1
        if not PLAUSIBLE_LUMBAR[0] <= lumbar_count <= PLAUSIBLE_LUMBAR[1]:
            return refuse(f"the anatomy contradicts itself: {lumbar_count} vertebrae lie between the last "
                          "rib-bearing vertebra and the sacrum, which no spine has; check the scan's orientation",
                          contradiction=True)
        anchor = "T12 and sacrum"
        names = _names_from_t12(n, t12, lumbar_count)
        if lumbar_count != EXPECTED_LUMBAR:
            flags.append(QCFlag("transitional_anatomy", (
                f"transitional anatomy: {lumbar_count} lumbar-type vertebrae between the last rib-bearing vertebra "
                f"and the sacrum ({EXPECTED_LUMBAR} expected); levels are numbered from the thoracolumbar junction "
                "(L1 = the first vertebra without ribs); confirm the numbering on a view of the whole spine")))
        base = CONFIDENCE["T12 and sacrum" if lumbar_count == EXPECTED_LUMBAR else "transitional"]
    elif t12 is not None:
        anchor, names, base = "T12", _names_from_t12(n, t12), CONFIDENCE["T12"]
        flags.append(QCFlag("single_anchor", (
            "levels numbered from the last rib-bearing vertebra (T12) only, the sacrum is not in view: a hypoplastic "
            "12th rib or a lumbar rib would shift every level by one")))
    else:
        anchor, names, base = "sacrum", _names_from_s1(n, s1), CONFIDENCE["sacrum"]
        flags.append(QCFlag("single_anchor", (
            "levels numbered from the sacrum only, the last rib-bearing vertebra is not in view: a sacralised L5 or a "
            "lumbarised S1 would shift every level by one")))
    for body, gap in ignored:
        flags.append(QCFlag("rib_ignored", (
            f"bone beside {names[body] or 'a vertebra'} reaches as far as a rib, but {gap} vertebrae without ribs lie "
            "above it (an implant's streaks or an iliac crest, not a rib): it was not counted as one")))
    origin = t12 if anchor != "sacrum" else s1
    levels = []
    faint = False
    first, last = chain.bodies[0], chain.bodies[-1]
    for name in LEVEL_NAMES:
        k = int(name[1])
        idx = names.index(name) if name in names else None
        if idx is None:
            want = t12 + k if anchor != "sacrum" else s1 - (EXPECTED_LUMBAR + 1 - k)
            above = want < 0
            edge = names[0] if above else names[-1]
            end_body = first if above else last
            scan_edge = chain.column.s_mm[chain.valid][0 if above else -1]
            gap = (end_body.top_s_mm - scan_edge) if above else (scan_edge - end_body.bottom_s_mm)
            if (end_body.cut_above if above else end_body.cut_below) or gap < _reference_height(chain, 0):
                reason = (f"not in the field of view: the scan {'starts' if above else 'ends'} "
                          + (f"at {edge}" if gap < 3.0 else f"{gap:.0f} mm {'above' if above else 'below'} {edge}"))
            else:
                reason = (f"not found: the vertebral chain ends at {edge}, {gap:.0f} mm from the "
                          f"{'top' if above else 'end'} of the scan")
            levels.append(LevelIdentity(name, None, False, False, anchor, None, 0.0, reason))
            continue
        count = abs(idx - origin)
        between = sorted((min(idx, origin), max(idx, origin)))
        strength = [chain.discs[d].strength for d in range(len(chain.discs))
                    if between[0] <= _disc_index(chain, d) < between[1]]
        factor = min([1.0] + [0.5 + 0.5 * min(1.0, s_) for s_ in strength])
        body = chain.bodies[idx]
        ref = _reference_height(chain, idx)
        measurable, reason = True, ""
        short = body.height_mm < MIN_VISIBLE_FRACTION * ref
        if short and (body.cut_above or body.cut_below):
            measurable = False
            reason = (f"only partly in the field of view: the scan cuts {name} ({body.height_mm:.0f} of about "
                      f"{ref:.0f} mm in view); not measured")
        elif short and not body.complete:
            measurable = False
            reason = (f"not measured: the vertebral chain ends in {name} ({body.height_mm:.0f} of about {ref:.0f} mm "
                      "followed; the spine could not be followed beyond it, e.g. beside an implant)")
        levels.append(LevelIdentity(name, idx, True, measurable, anchor, count, base * factor, reason))
        faint = faint or factor < FAINT_FACTOR
    # a vertebra far taller than its neighbours holds two (a disc that was not seen): every level counted across it
    # is uncertain, and is not measured
    ref_all = float(np.median([b.height_mm for b in chain.bodies if b.complete])) if any(
        b.complete for b in chain.bodies) else 25.0
    tall = [i for i, b in enumerate(chain.bodies) if b.height_mm > MERGED_HEIGHT_RATIO * ref_all
            and i not in anchors.sacrum.sacral_bodies]
    for i in tall:
        label = names[i] or "a vertebra"
        flags.append(QCFlag("uncertain_identification", (
            f"uncertain identification: {label} is {chain.bodies[i].height_mm:.0f} mm tall (its neighbours about "
            f"{ref_all:.0f} mm), which may be two vertebrae with a disc that was not seen; the levels counted across "
            "it are not measured")))
        for lv in levels:
            if lv.identified and lv.body is not None and min(lv.body, origin) <= i <= max(lv.body, origin):
                lv.measurable = False
                lv.confidence *= 0.5
                lv.reason = (f"uncertain identification: the count from {anchor} passes a vertebra "
                             f"{chain.bodies[i].height_mm:.0f} mm tall (two vertebrae?); not measured")
    if faint and not any(f.code == "uncertain_identification" for f in flags):
        flags.append(QCFlag("uncertain_identification", (
            "uncertain identification: a disc along the count is faint; check the numbering")))
    return SpineIdentification(chain, anchors, names, anchor, lumbar_count, t12, s1 if s1_usable else None,
                               levels, flags)


def _disc_index(chain: VertebralChain, d: int) -> int:
    """Index of the body just above disc ``d`` (the disc lies between bodies i and i + 1)."""
    s = chain.discs[d].s_mm
    above = [i for i, b in enumerate(chain.bodies) if b.centre_s_mm < s]
    return above[-1] if above else -1


def identify_spine(volume: CTVolume, canal: CanalResult) -> SpineIdentification:
    """Chain, anchors and numbering of a CT whose canal was found."""
    t0 = time.perf_counter()
    chain = find_chain(volume, canal)
    t1 = time.perf_counter()
    anchors = find_anchors(volume, chain)
    t2 = time.perf_counter()
    ident = number_chain(chain, anchors)
    ident.timings_s = {"chain": t1 - t0, "anchors": t2 - t1, "numbering": time.perf_counter() - t2}
    return ident
