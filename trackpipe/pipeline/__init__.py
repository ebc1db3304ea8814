"""What happens to every event, in order: decode -> validate -> enrich -> dedupe + store."""
