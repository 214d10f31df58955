import typer
app = typer.Typer()
@app.command()
def synth(): pass
