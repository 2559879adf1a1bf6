"""Instructions the caption embedder is trained and queried with (LLM2CLIP's, plus two of ours).

They live apart from stage 1 because the shapes-world corpus also contains them, so the tiny LM's
tokenizer and pretraining have seen the words.
"""

DEFAULT = "Given a caption, retrieve a similar relevant caption"  # the paper's prompt; also used for encoding
SHORT_TO_LONG = "Given a sentence, retrieve a detailed relevant sentence"  # LLM2CLIP's E5_cc3m.py
LONG_TO_SHORT = "Given a detailed sentence, retrieve a short relevant sentence"  # LLM2CLIP's E5_cc3m.py
LONG_TO_LONG = "Given a detailed sentence, retrieve a paraphrase of it"
TRANSLATION = "Given a sentence, retrieve the same sentence in another language"

ALL = (DEFAULT, SHORT_TO_LONG, LONG_TO_SHORT, LONG_TO_LONG, TRANSLATION)
