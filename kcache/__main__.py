from kcache.cli import app

app()
