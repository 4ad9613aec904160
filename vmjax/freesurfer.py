"""FreeSurfer's label names: the aseg structures and DKT cortical parcels of the OASIS / Mindboggle
label maps, and the 30 structures VoxelMorph reports. Used to name rows of Dice tables and to
merge left and right into one structure in the figures."""

from __future__ import annotations

# FreeSurfer colour-table (FreeSurferColorLUT.txt) names of the labels evaluated here.
ASEG_NAMES = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 6: "Left-Cerebellum-Exterior", 7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum",
    14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus",
    18: "Left-Amygdala", 24: "CSF", 26: "Left-Accumbens-area", 28: "Left-VentralDC",
    30: "Left-vessel", 31: "Left-choroid-plexus", 41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle", 44: "Right-Inf-Lat-Vent",
    45: "Right-Cerebellum-Exterior",
    46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus",
    50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum", 53: "Right-Hippocampus",
    54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC", 62: "Right-vessel",
    63: "Right-choroid-plexus", 72: "5th-Ventricle", 85: "Optic-Chiasm",
    91: "Left-Basal-Forebrain", 92: "Right-Basal-Forebrain",
    630: "Cerebellar-Vermal-Lobules-I-V", 631: "Cerebellar-Vermal-Lobules-VI-VII",
    632: "Cerebellar-Vermal-Lobules-VIII-X",
}
_DKT = {2: "caudalanteriorcingulate", 3: "caudalmiddlefrontal", 5: "cuneus", 6: "entorhinal",
        7: "fusiform", 8: "inferiorparietal", 9: "inferiortemporal", 10: "isthmuscingulate",
        11: "lateraloccipital", 12: "lateralorbitofrontal", 13: "lingual",
        14: "medialorbitofrontal", 15: "middletemporal", 16: "parahippocampal",
        17: "paracentral", 18: "parsopercularis", 19: "parsorbitalis", 20: "parstriangularis",
        21: "pericalcarine", 22: "postcentral", 23: "posteriorcingulate", 24: "precentral",
        25: "precuneus", 26: "rostralanteriorcingulate", 27: "rostralmiddlefrontal",
        28: "superiorfrontal", 29: "superiorparietal", 30: "superiortemporal",
        31: "supramarginal", 34: "transversetemporal", 35: "insula"}
LABEL_NAMES = {**ASEG_NAMES, **{1000 + k: f"ctx-lh-{v}" for k, v in _DKT.items()},
               **{2000 + k: f"ctx-rh-{v}" for k, v in _DKT.items()}}
# The 30 structures VoxelMorph reports (its fig. 5), left then right.
VOXELMORPH_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43,
                     46, 47, 49, 50, 51, 52, 53, 54, 60, 63)


def label_name(label: int) -> str:
  """FreeSurfer's name of ``label`` (``label-N`` for one it does not name)."""
  return LABEL_NAMES.get(int(label), f"label-{int(label)}")


def structure_name(label: int) -> str:
  """The name with its hemisphere removed, so left and right merge into one structure."""
  name = label_name(label)
  for prefix in ("Left-", "Right-", "ctx-lh-", "ctx-rh-"):
    if name.startswith(prefix):
      return ("ctx-" if prefix.startswith("ctx") else "") + name[len(prefix):]
  return name
