"""The other tools tunepipe talks to: Ollama (client, Modelfile, TEMPLATE rendering), llama.cpp and the MLflow
model registry. Below every stage: it imports none."""
