"""The models that ship inside homer_ref (package data), so that a clone alone runs every test and tutorial.

passkey_model/  a 1.19M-parameter Llama trained here on the passkey task (its README is the model card)
stories260K/    llama2.c's tiny pretrained TinyStories Llama (MIT), with its tokenizer and golden text
calibration/    the default calibration text: ordinary English prose written for this project (`homer_ref.bias`)
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent
PASSKEY_MODEL = DATA / "passkey_model"
STORIES260K = DATA / "stories260K"
CALIBRATION_TEXT = DATA / "calibration" / "text.txt"
