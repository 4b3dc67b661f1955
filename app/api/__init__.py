"""REST API: request/response models, routes and the error-to-HTTP mapping."""
