"""`fluxc serve`: the pipeline opened once, behind a web page and an OpenAI-style images API.

request.py  the generation request: JSON -> checked fields (400 naming the field otherwise)
jobs.py     one worker thread owning the pipeline; the FIFO job queue, job states, cancel
app.py      the FastAPI app: /health, /v1/models, /v1/images/generations, /v1/images/jobs
page.py     the Gradio page, mounted in the same app; its progress is the job's state
"""
