"""An offline `evaluate` module for classification, on scikit-learn.

`evaluate.load("accuracy")` fetches its script from the Hub and fails offline, so peftlab
ships this one and loads it by path. It returns every number the metrics.json promises.
Averages cover the classes present in the split (gold or predicted); the per-class report and
the confusion matrix list every class, absent ones with support 0.
"""

import datasets
import evaluate
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)


class PeftlabClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy, macro/weighted precision, recall and F1, per-class report "
                        "and confusion matrix.",
            citation="",
            inputs_description="predictions and references: class ids; label_names: names "
                               "in id order.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, label_names=None):
        ids = list(range(len(label_names))) if label_names else sorted(
            set(references) | set(predictions))
        names = list(label_names) if label_names else [str(i) for i in ids]
        result = {"accuracy": float(accuracy_score(references, predictions))}
        for average in ("macro", "weighted"):
            # labels=None: average over the classes in this split's gold labels or predictions,
            # so a class the split lacks entirely is not a 0 that drags the mean down
            p, r, f, _ = precision_recall_fscore_support(
                references, predictions, labels=None, average=average, zero_division=0)
            result |= {f"precision_{average}": float(p), f"recall_{average}": float(r),
                       f"f1_{average}": float(f)}
        report = classification_report(references, predictions, labels=ids, target_names=names,
                                       output_dict=True, zero_division=0)
        result["per_class"] = {name: {k: float(v) for k, v in report[name].items()}
                               for name in names}
        result["confusion_matrix"] = confusion_matrix(references, predictions,
                                                      labels=ids).tolist()
        return result
