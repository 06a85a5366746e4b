"""ich_kaggle: RSNA Intracranial Hemorrhage Detection, from raw DICOMs to a scored submission and a Kaggle kernel."""

__version__ = "0.1.0"

COMPETITION = "rsna-intracranial-hemorrhage-detection"

# Label order used everywhere (arrays, CSV columns, model logits).
LABELS: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
# The competition metric weighs `any` twice as much as each subtype.
LABEL_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
