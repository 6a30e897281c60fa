from peftlab.tasks.classification_metrics import classification_metrics


def test_macro_averages_skip_classes_absent_from_the_split():
    labels = [0, 0, 1, 1, 1]  # class 2 ("c") is in the label set, not in this split
    result = classification_metrics(labels, labels, ["a", "b", "c"])
    assert result["f1_macro"] == 1.0
    assert result["precision_macro"] == result["recall_macro"] == 1.0
    assert result["f1_weighted"] == 1.0
    assert result["per_class"]["c"]["support"] == 0
    assert result["confusion_matrix"] == [[2, 0, 0], [0, 3, 0], [0, 0, 0]]


def test_macro_averages_count_classes_only_predicted():
    result = classification_metrics([0, 2], [0, 1], ["a", "b", "c"])
    assert result["recall_macro"] == 1 / 3  # a: 1, b: 0, c (predicted, never gold): 0
    assert set(result["per_class"]) == {"a", "b", "c"}
