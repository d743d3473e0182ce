"""Quantization tags in GGUF file names, and grouping a repo's files into loadable models.

Pure functions, no I/O. Matching is by equality of whole tags, never by substring, because
publishers use tags that contain one another: `Q4_K_M` must not pick `Q4_K_M_L`, `IQ4_K_M`
or unsloth's dynamic `UD-Q4_K_M`.

A quant the user names is checked against the names llama.cpp gives its quantizations
(`quant_problem`): a typo (`Q4KM`) otherwise surfaced as "no verified copy of org/model Q4KM" or
as a plan that went on without it, never as the typo it was.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

# llama.cpp's short names for the medium K-quants (tools/quantize).
QUANT_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# The quantizations this llama.cpp loads, by the names its tools/quantize gives them and publishers
# put in file names, best first. Types llama.cpp has removed (Q4_0_4_4 and kin) are left out: it
# refuses their files.
GGUF_QUANTS = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "IQ4_XS", "IQ4_NL", "MXFP4", "MXFP4_MOE", "NVFP4", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS",
    "IQ3_XXS", "Q2_K", "Q2_K_S", "Q2_0", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "TQ2_0", "IQ1_M", "IQ1_S", "TQ1_0", "Q1_0",
)  # fmt: skip
# Publishers' variants of a K-quant: bartowski's `_L` and `_XL` (embeddings and output kept at
# Q8_0) and unsloth's dynamic quants, any of these names after `UD-` (`UD-Q4_K_XL`, `UD-IQ2_M`).
_PUBLISHER_VARIANT = re.compile(r"Q[2-8]_K_X?L")
_VARIANT_NAMES = ("Q2_K_L", "Q2_K_XL", "Q3_K_XL", "Q4_K_L", "Q4_K_XL", "Q5_K_L", "Q5_K_XL", "Q6_K_L", "Q6_K_XL", "Q8_K_XL")
DYNAMIC_PREFIX = "UD-"
_WHAT_A_REPO_OFFERS = "`vramsupply plan --model MODEL` or `vramsupply models resolve MODEL` lists what a repo offers"

# Files that sit next to models but are not models themselves.
SIDECAR_MARKERS = ("mmproj", "imatrix")

_TAG = r"(?:UD-)?(?:I?Q\d+(?:_[0-9A-Z]+)*|TQ\d_\d|BF16|F16|F32|MXFP4(?:_MOE)?|NVFP4)"
_TAG_AT_END = re.compile(rf"(?:^|[-._])(?P<tag>{_TAG})$", re.IGNORECASE)
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)


@dataclass(frozen=True)
class GgufPath:
    """One .gguf file of a repo, with its quant tag and split position (1 of 1 when not split)."""

    path: str
    quant: str | None
    part: int
    parts: int
    prefix: str


@dataclass(frozen=True)
class QuantGroup:
    """The file(s) of one loadable model: every split part in order; llama.cpp loads the first."""

    quant: str | None
    paths: tuple[str, ...]


def normalize_quant(quant: str) -> str:
    """Case-fold and apply llama.cpp's aliases, so `q4_k` and `Q4_K_M` compare equal."""
    tag = quant.strip().upper()
    return QUANT_ALIASES.get(tag, tag)


def is_known_quant(quant: str) -> bool:
    """Whether ``quant`` (normalised) names a quantization llama.cpp loads, or a publisher's variant of one."""
    base = quant.removeprefix(DYNAMIC_PREFIX)
    return base in GGUF_QUANTS or _PUBLISHER_VARIANT.fullmatch(base) is not None


def quant_problem(quant: str) -> str | None:
    """What keeps ``quant`` from naming a GGUF quantization, in one line with the names close to it
    (or llama.cpp's list), or None. For the quant setting's validator, so that every command
    (serve, plan, bench, models pull and resolve) refuses a typo alike, whatever its source."""
    wanted = normalize_quant(quant)
    if not wanted:
        return "name a quantization, e.g. Q4_K_M"
    if is_known_quant(wanted):
        return None
    prefix = DYNAMIC_PREFIX if wanted.startswith(DYNAMIC_PREFIX) else ""
    close = difflib.get_close_matches(wanted.removeprefix(prefix), [*GGUF_QUANTS, *_VARIANT_NAMES], n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {_either(list(dict.fromkeys(prefix + name for name in close)))}?"
    else:
        hint = f"llama.cpp's are {_either(list(GGUF_QUANTS), 'and')}, with publishers' variants such as Q4_K_L and UD-Q4_K_XL"
    return f"not a GGUF quantization; {hint} ({_WHAT_A_REPO_OFFERS})"


def _either(names: list[str], word: str = "or") -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def quant_of_name(name: str) -> str | None:
    """The quant tag ending a file stem or folder name (`Qwen3-8B-Q4_K_M` → `Q4_K_M`), if any."""
    match = _TAG_AT_END.search(name)
    return normalize_quant(match["tag"]) if match else None


def parse_gguf_path(path: str) -> GgufPath | None:
    """Describe a repo file, or None when it is not a model GGUF (other extension or a sidecar)."""
    directory, basename = posixpath.split(path)
    if not basename.lower().endswith(".gguf") or any(marker in basename.lower() for marker in SIDECAR_MARKERS):
        return None
    stem = basename[: -len(".gguf")]
    part, parts = 1, 1
    split = _SPLIT.match(stem)
    if split:
        stem, part, parts = split["prefix"], int(split["index"]), int(split["count"])
    quant = quant_of_name(stem) or (quant_of_name(posixpath.basename(directory)) if directory else None)
    return GgufPath(path=path, quant=quant, part=part, parts=parts, prefix=posixpath.join(directory, stem))


def _split_sets(paths: Iterable[str]) -> dict[tuple[str, int], list[GgufPath]]:
    """Model files keyed by model: a split set's prefix and part count, or a single file's path."""
    sets: dict[tuple[str, int], list[GgufPath]] = defaultdict(list)
    for path in paths:
        parsed = parse_gguf_path(path)
        if parsed is not None:
            sets[(parsed.prefix if parsed.parts > 1 else parsed.path, parsed.parts)].append(parsed)
    for members in sets.values():
        members.sort(key=lambda member: member.part)
    return sets


def group_models(paths: Iterable[str]) -> list[QuantGroup]:
    """Group a repo's files into models; split sets missing a part are dropped (they cannot load)."""
    groups = [
        QuantGroup(quant=members[0].quant, paths=tuple(member.path for member in members))
        for (_, parts), members in _split_sets(paths).items()
        if [member.part for member in members] == list(range(1, parts + 1))
    ]
    return sorted(groups, key=lambda group: (group.paths[0].count("/"), group.paths[0]))


def incomplete_sets(paths: Iterable[str]) -> list[str]:
    """The split sets that lack a part, said for a message: `m-Q4_K_M-*-of-00003.gguf lacks part 2 of 3`."""
    found = []
    for (prefix, parts), members in sorted(_split_sets(paths).items()):
        missing = sorted(set(range(1, parts + 1)) - {member.part for member in members})
        if parts > 1 and missing:
            shown = ", ".join(str(part) for part in missing[:5]) + (", ..." if len(missing) > 5 else "")
            found.append(f"{prefix}-*-of-{parts:05d}.gguf lacks part{'s' if len(missing) > 1 else ''} {shown} of {parts}")
    return found


def available_quants(groups: Iterable[QuantGroup]) -> list[str]:
    """The distinct quant tags on offer, sorted, for error messages and `models resolve`."""
    return sorted({group.quant for group in groups if group.quant is not None})


def select_quant(paths: Iterable[str], quant: str) -> QuantGroup | None:
    """The model group whose tag equals `quant`; the shallowest path wins when several do."""
    wanted = normalize_quant(quant)
    return next((group for group in group_models(paths) if group.quant == wanted), None)
