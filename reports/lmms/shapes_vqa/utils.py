"""lmms-eval hooks of the shapes_vqa task (shapes_vqa.yaml): the question as asked, its one image, and
visprune's rule: an answer is right when its normalized first word is the expected word."""

from visprune.tasks.shapes_vqa import normalize_answer


def doc_to_visual(doc):
    from PIL import Image

    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(normalize_answer(results[0]) == doc["answer"])}
