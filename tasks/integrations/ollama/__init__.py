"""Serving in Ollama, split by concern.

- `host`: where Ollama listens (`ollama.host`, else $OLLAMA_HOST, as Ollama itself reads them);
- `template`: a Hugging Face chat template translated to Ollama's Go TEMPLATE (derived from what it renders,
  proven equal to training's rendering), and its stops;
- `render`: what Ollama's /api/chat feeds a model, rendered by Go's own text/template (`gotemplate/`);
- `modelfile`: what a Modelfile says, as data, written to disk and sent to /api/create alike;
- `client`: the HTTP calls, through the official `ollama` client where it covers them.

The stages that use them (register, smoke test, promote) are in `tasks/serve/task.py`.
"""
