"""TFLite metadata for our model files, so a phone's standard client (MediaPipe Tasks ImageClassifier on Android,
iOS, web or Python) loads them as they are: model name and description, the input image (RGB, how pixels are
normalised) and the class labels in output order, with the labels file packed inside the .tflite.

Written with MediaPipe's own metadata writer (``mediapipe.tasks.python.metadata.metadata_writers``): it is the one
maintained today and the one its ImageClassifier reads. ai-edge-litert 2.3 ships the TFLite schema but no metadata
writer, and tflite-support (the writer's old home) has had no release since 2023 and pins protobuf < 4, which
conflicts with TensorFlow 2.21 and MediaPipe here. Only the bundle writer (edge-quantize, edge-adapt) needs it;
the device runtime does not.

One gap is bridged here: the mediapipe 1.2 wheel no longer ships the compiled helper its populator imports to stamp
the metadata's minimum parser version (``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version``).
:func:`_minimum_parser_version` supplies that one function for the metadata we write, and refuses any other.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import List

MODEL_NAME = "malaria-edge cell classifier"
PHONE_DESCRIPTION = ("Tells a parasitized from an uninfected red blood cell in a Giemsa-stained thin blood smear. "
                     "A screening aid, not a diagnosis: see the model card (JSON beside this file) for its test "
                     "patients and figures.")
VERSION_HELPER = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def _minimum_parser_version(metadata_buffer: bytes) -> str:
    """The oldest metadata parser that reads our metadata: "1.0.0", the schema's first version, because we use only
    its original members (general info, image input with normalisation, classification output with a labels file).
    Anything newer (subgraph-level process units, tensor groups, tokenizers, audio, custom metadata, versioned or
    vocabulary files) is refused rather than stamped with a version too old for it."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    model = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(metadata_buffer, 0))
    newer = []
    files = list(model.associatedFiles or [])
    for graph in model.subgraphMetadata or []:
        if graph.inputProcessUnits or graph.outputProcessUnits:
            newer.append("subgraph process units")
        if graph.inputTensorGroups or graph.outputTensorGroups or graph.customMetadata:
            newer.append("tensor groups or custom metadata")
        files += list(graph.associatedFiles or [])
        for tensor in list(graph.inputTensorMetadata or []) + list(graph.outputTensorMetadata or []):
            files += list(tensor.associatedFiles or [])
            if tensor.content and tensor.content.contentPropertiesType not in (
                    fb.ContentProperties.ImageProperties, fb.ContentProperties.FeatureProperties):
                newer.append("content other than image or feature")
            for unit in tensor.processUnits or []:
                if unit.optionsType != fb.ProcessUnitOptions.NormalizationOptions:
                    newer.append("process units other than normalisation")
    for f in files:
        if f.type not in (fb.AssociatedFileType.TENSOR_AXIS_LABELS, fb.AssociatedFileType.DESCRIPTIONS) or f.version:
            newer.append("associated files other than labels")
    if newer:
        raise ValueError(f"metadata uses members newer than parser 1.0.0 ({', '.join(sorted(set(newer)))}); "
                         "install a mediapipe whose metadata populator works on its own")
    return "1.0.0"


def _metadata_writer():
    """MediaPipe's metadata writer module, with the version helper supplied when the wheel lacks it."""
    import importlib
    import sys
    import types

    try:
        importlib.import_module(VERSION_HELPER)
    except ImportError:
        package, _, name = VERSION_HELPER.rpartition(".")
        helper = types.ModuleType(VERSION_HELPER)
        helper.GetMinimumMetadataParserVersion = _minimum_parser_version
        sys.modules[VERSION_HELPER] = helper
        sys.modules.setdefault(package, types.ModuleType(package))
        setattr(sys.modules[package], name, helper)
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer
    return metadata_writer


def describe_input(size: int, dtype: str) -> str:
    """What the input tensor wants, in words a phone developer reads in the metadata."""
    pixels = "uint8 RGB pixels 0-255" if dtype == "uint8" else "float32 RGB pixels 0-255"
    return (f"One thin-smear red blood cell, {pixels}, resized to {size}x{size}; the whole cell on a black "
            "background, as cut by edge_runtime. No other preprocessing: the graph scales the pixels itself.")


def write_metadata(path: Path, labels: List[str], size: int, float_input: bool, description: str) -> None:
    """Add metadata to the TFLite file at ``path`` in place.

    ``float_input``: the file takes float32 pixels; MediaPipe then needs NormalizationOptions, and mean 0, std 1
    hands it the pixels 0..255 unchanged, which is what the graph expects (its first layer rescales them). A uint8
    input gets no normalisation: the client passes raw pixels.
    """
    from mediapipe.tasks.metadata import metadata_schema_py_generated as metadata_fb

    metadata_writer = _metadata_writer()
    writer = metadata_writer.MetadataWriter.create(bytearray(path.read_bytes()))
    writer.add_general_info(MODEL_NAME, description)
    writer.add_image_input(norm_mean=[0.0] if float_input else None, norm_std=[1.0] if float_input else None,
                           color_space_type=metadata_fb.ColorSpaceType.RGB, name="cell",
                           description=describe_input(size, "float32" if float_input else "uint8"))
    writer.add_classification_output(metadata_writer.Labels().add(labels), name="scores",
                                     description="Probability of each class, in label order: "
                                                 + ", ".join(labels) + "; they sum to 1.")
    model, _ = writer.populate()
    path.write_bytes(bytes(model))
    del writer
    gc.collect()  # the writer sits in a reference cycle; collect it now so its temporary folder goes while we run


def read_metadata(path: Path) -> dict:
    """The metadata of a TFLite file as a dict (name, input/output descriptions, normalisation) plus its packed
    labels, for checks and tests."""
    import json

    _metadata_writer()
    from mediapipe.tasks.python.metadata import metadata

    displayer = metadata.MetadataDisplayer.with_model_file(str(path))
    info = json.loads(displayer.get_metadata_json())
    files = displayer.get_packed_associated_file_list()
    info["packed_labels"] = {name: displayer.get_associated_file_buffer(name).decode().split()
                             for name in files}
    return info


def write_bundle_metadata(int8_path: Path, fp32_path: Path, labels: List[str], size: int) -> None:
    """The phone metadata of a bundle's two files (uint8 input for int8, float input for fp32), as edge-quantize
    and edge-adapt write them."""
    for path, float_input in ((int8_path, False), (fp32_path, True)):
        write_metadata(path, labels, size, float_input, PHONE_DESCRIPTION)
