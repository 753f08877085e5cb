variable "bucket_name" {
  description = <<-EOT
    Name of the bucket. For `bucket_type = "general_purpose"` this is the full
    bucket name. For `bucket_type = "directory"` it is the base name: the
    bucket is named `<bucket_name>--<availability_zone_id>--x-s3`.
  EOT
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name)) && !strcontains(var.bucket_name, "..")
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit."
  }
}

variable "bucket_type" {
  description = "\"general_purpose\" for a regular S3 bucket, \"directory\" for an S3 Express One Zone directory bucket."
  type        = string
  default     = "general_purpose"
  nullable    = false

  validation {
    condition     = contains(["general_purpose", "directory"], var.bucket_type)
    error_message = "bucket_type must be \"general_purpose\" or \"directory\"."
  }
}

variable "availability_zone_id" {
  description = "Availability Zone ID (for example \"use1-az4\", not the zone name \"us-east-1a\") that holds a directory bucket. Required when bucket_type = \"directory\", ignored otherwise."
  type        = string
  default     = null

  validation {
    condition     = var.availability_zone_id == null || can(regex("^[a-z0-9]+(-[a-z0-9]+)*-az[0-9]+$", var.availability_zone_id))
    error_message = "availability_zone_id must be an AZ ID such as \"use1-az4\"."
  }
}

variable "prefix" {
  description = <<-EOT
    Key prefix under which s3kv stores KV blocks (no leading or trailing "/").
    IAM access is scoped to `<prefix>/*` on general-purpose buckets.
  EOT
  type        = string
  default     = "s3kv"
  nullable    = false

  validation {
    # Only characters that are literal in IAM ARNs and s3:prefix conditions:
    # "*" or "?" would silently widen the scope of the policies.
    condition     = can(regex("^[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*$", var.prefix))
    error_message = "prefix must be non-empty path segments of [A-Za-z0-9._=-] separated by single \"/\", with no leading or trailing \"/\"."
  }
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete the bucket while it still holds objects."
  type        = bool
  default     = false
  nullable    = false
}

variable "kms_key_arn" {
  description = <<-EOT
    ARN of a customer-managed KMS key for default encryption (SSE-KMS with S3
    Bucket Keys). null keeps SSE-S3 (AES256) and adds no KMS permissions.
  EOT
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:<partition>:kms:<region>:<account>:key/<id>)."
  }
}

variable "expire_after_days" {
  description = "Expire every object under `<prefix>/` this many days after it was written. null turns expiration off."
  type        = number
  default     = null

  validation {
    condition     = var.expire_after_days == null || try(var.expire_after_days >= 1 && floor(var.expire_after_days) == var.expire_after_days, false)
    error_message = "expire_after_days must be null or a whole number of days >= 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Abort multipart uploads that are still incomplete this many days after they started."
  type        = number
  default     = 1
  nullable    = false

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1 && floor(var.abort_incomplete_multipart_upload_days) == var.abort_incomplete_multipart_upload_days
    error_message = "abort_incomplete_multipart_upload_days must be a whole number >= 1."
  }
}

variable "iam_name_prefix" {
  description = "Prefix of the IAM policy and role names (`<prefix>-engine`, `<prefix>-engine-readonly`, `<prefix>-gc`). null means `s3kv-<bucket_name>`."
  type        = string
  default     = null

  validation {
    condition     = var.iam_name_prefix == null || can(regex("^[A-Za-z0-9+=,.@_-]{1,48}$", var.iam_name_prefix))
    error_message = "iam_name_prefix must be 1-48 characters of [A-Za-z0-9+=,.@_-]."
  }
}

variable "iam_path" {
  description = "IAM path of the policies and roles."
  type        = string
  default     = "/"
  nullable    = false

  validation {
    condition     = can(regex("^/([\\x21-\\x7e]*/)?$", var.iam_path))
    error_message = "iam_path must begin and end with \"/\"."
  }
}

variable "roles" {
  description = <<-EOT
    IAM roles to create, per party. A role is created only for the keys that are
    set; each gets the matching policy attached. Give either trusted principals
    (`trusted_principal_arns` and/or `trusted_services`, allowed to call
    sts:AssumeRole) or a complete `assume_role_policy` JSON document (for
    example for web identity / EKS IRSA), not both.
    ```
    roles = {
      engine = { trusted_principal_arns = ["arn:aws:iam::123456789012:role/vllm-node"] }
      gc     = { assume_role_policy = data.aws_iam_policy_document.irsa.json }
    }
    ```
  EOT
  type = object({
    engine = optional(object({
      trusted_principal_arns = optional(list(string), [])
      trusted_services       = optional(list(string), [])
      assume_role_policy     = optional(string)
      name                   = optional(string)
      max_session_duration   = optional(number, 3600)
      permissions_boundary   = optional(string)
    }))
    engine_readonly = optional(object({
      trusted_principal_arns = optional(list(string), [])
      trusted_services       = optional(list(string), [])
      assume_role_policy     = optional(string)
      name                   = optional(string)
      max_session_duration   = optional(number, 3600)
      permissions_boundary   = optional(string)
    }))
    gc = optional(object({
      trusted_principal_arns = optional(list(string), [])
      trusted_services       = optional(list(string), [])
      assume_role_policy     = optional(string)
      name                   = optional(string)
      max_session_duration   = optional(number, 3600)
      permissions_boundary   = optional(string)
    }))
  })
  default  = {}
  nullable = false

  validation {
    condition = alltrue([
      for party, role in var.roles : role == null ? true : (
        (length(role.trusted_principal_arns) + length(role.trusted_services) > 0) != (role.assume_role_policy != null)
      )
    ])
    error_message = "Each role needs either trusted_principal_arns/trusted_services or assume_role_policy (exactly one of the two kinds)."
  }

  validation {
    condition = alltrue([
      for party, role in var.roles : role == null ? true : try(length(role.name), 0) <= 64
    ])
    error_message = "IAM role names are limited to 64 characters."
  }
}

variable "tags" {
  description = "Tags for the general-purpose bucket, the IAM policies and the roles (the provider's directory bucket resource takes no tags)."
  type        = map(string)
  default     = {}
  nullable    = false
}
