"""Stage 4, runtime: the inference API, image + prompt -> text over an engine folder (runners and the token loop).

    from runtime import Pipeline
    pipe = Pipeline.from_engine_dir("runs/demo/engine")
    print(pipe.generate("cat.png", pipe.chat_prompt("What is this?"), max_new_tokens=16).text)
"""

from runtime.pipeline import Generation, Pipeline

__all__ = ["Generation", "Pipeline"]
