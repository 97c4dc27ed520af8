"""A server written the way the seed tutorials write it, for comparison only.

An ``async def`` endpoint calls ``model.generate`` directly on the event loop: one request at a
time, and nothing else (not even ``/health``) is answered while it runs.

    python benchmarks/seed_server.py MODEL_DIR PORT [DTYPE]
"""

import sys
import time

import torch
import uvicorn
from fastapi import FastAPI, Request

from helpers.loading import load_model

torch.set_num_threads(1)
loaded = load_model(sys.argv[1], dtype=sys.argv[3] if len(sys.argv) > 3 else "auto")
model, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.chat_format
app = FastAPI()


@app.post("/")
async def create_item(request: Request):
    json_post = await request.json()
    prompt = json_post.get("prompt")
    history = json_post.get("history") or []
    max_length = json_post.get("max_length")
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": prompt})
    ids = torch.tensor([fmt.encode(tokenizer, messages)])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_length,
                            min_new_tokens=max_length, do_sample=False, repetition_penalty=1.0,
                            eos_token_id=loaded.stop_ids,
                            pad_token_id=loaded.pad_id)
    new = output[0, ids.shape[1]:]
    response = tokenizer.decode(new, skip_special_tokens=True)
    return {"response": response, "history": history + [[prompt, response]], "status": 200,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "tokens": int(new.shape[0])}


@app.get("/health")
async def health():
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
