"""MLflow pyfunc model of an adapter ("models from code": nothing is pickled).

`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(["a sentence", ...])` (a list of texts or
prompts) returns, for a
sequence-classification adapter, a DataFrame with the decided label and one probability column per
class; for a causal-LM adapter, the completions as a list of strings.
"""



import mlflow
from mlflow.pyfunc import PythonModel


def _as_list(model_input) -> list:
    try:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            col = next((c for c in ("text", "prompt", "inputs") if c in model_input.columns),
                       model_input.columns[0])
            return model_input[col].tolist()
        if isinstance(model_input, pd.Series):
            return model_input.tolist()
    except ImportError:  # pandas comes with mlflow; keep plain lists working without it
        pass
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


class AdapterModel(PythonModel):
    def load_context(self, context):
        from workers.artifact import verify
        from workers.inference import Engine
        from workers.trust import manifest_base, serving_spec

        folder = context.artifacts["adapter"]
        manifest = verify(folder)
        self.task = manifest["task"]
        # the base the operator's pipeline logged with the model; older models: the manifest's, no remote code
        base = (context.model_config or {}).get("base")
        self.engine = Engine(serving_spec(manifest, base, folder) if base else manifest_base(manifest, folder))
        self.engine.add_adapter("adapter", folder, manifest)

    def predict(self, context, model_input: list[str], params: dict | None = None):
        params = params or {}
        inputs = _as_list(model_input)
        if self.task == "seq-cls":
            import pandas as pd

            rows = self.engine.classify("adapter", inputs)
            return pd.DataFrame(
                [{"label": r["label"], **{f"prob_{k}": v for k, v in r["probabilities"].items()}}
                 for r in rows]
            )
        return [
            self.engine.complete("adapter", p, max_tokens=int(params.get("max_tokens", 64)))["text"]
            for p in inputs
        ]


mlflow.models.set_model(AdapterModel())
